//! Where a stream is pushed: a `--whip-push` URL whose `{id}` (anywhere in
//! its path) is replaced by the stream id.

use std::str::FromStr;

use crate::http_client::Url;

/// The placeholder for the stream id.
const ID: &str = "{id}";

/// One `--whip-push` URL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    template: Url,
}

impl PushTarget {
    /// The WHIP endpoint `stream` is pushed to.
    pub fn for_stream(&self, stream: &str) -> Url {
        Url {
            path: self.template.path.replace(ID, stream),
            ..self.template.clone()
        }
    }
}

impl FromStr for PushTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let template = Url::parse(s)?;
        if template.host.contains(ID) {
            return Err("{id} may only appear in the URL's path".into());
        }
        Ok(PushTarget { template })
    }
}

impl std::fmt::Display for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.template.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_id_fills_every_placeholder_of_the_path() {
        let t: PushTarget = "http://127.0.0.1:9000/whip/{id}?room={id}".parse().unwrap();
        assert_eq!(
            t.for_stream("stream_ab12").to_string(),
            "http://127.0.0.1:9000/whip/stream_ab12?room=stream_ab12"
        );
        let fixed: PushTarget = "http://edge/whip/live".parse().unwrap();
        assert_eq!(
            fixed.for_stream("s1").to_string(),
            "http://edge:80/whip/live"
        );
        assert!("http://{id}.edge/whip".parse::<PushTarget>().is_err());
        assert!("https://edge/whip/{id}".parse::<PushTarget>().is_err());
    }
}
