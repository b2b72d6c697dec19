//! The few checks WHIP and WHEP make on their own: which stream names a
//! WHIP client may ask for.

/// Longest stream name a WHIP client may ask for.
const MAX_NAME: usize = 64;

/// Whether `name` may be a stream id: 1 to 64 ASCII letters, digits, `-`
/// or `_` (safe in a URL path and a file name, no `.` to clash with
/// `{id}.mp3`), and not `latest`, which names the newest stream.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "latest"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        for good in ["studio", "Kitchen-2", "a_b", &"x".repeat(64)] {
            assert!(valid_stream_name(good), "{good}");
        }
        for bad in [
            "",
            "latest",
            "a.mp3",
            "a/b",
            "ä",
            "a b",
            "%2e",
            &"x".repeat(65),
        ] {
            assert!(!valid_stream_name(bad), "{bad}");
        }
    }
}
