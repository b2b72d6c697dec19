//! The few checks WHIP and WHEP make on their own: which stream names a
//! WHIP client may ask for, and which m-line of a WHEP offer is its audio.

use str0m::media::Mid;

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

/// The `a=mid` of the first audio m-line of `sdp`.
pub fn audio_mid(sdp: &str) -> Option<Mid> {
    let mut in_audio = false;
    for line in sdp.lines().map(str::trim) {
        if line.starts_with("m=") {
            if in_audio {
                return None;
            }
            in_audio = line.starts_with("m=audio ");
        } else if let Some(mid) = line.strip_prefix("a=mid:").filter(|_| in_audio) {
            let mid = mid.trim();
            return (!mid.is_empty()).then(|| Mid::from(mid));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audio_mid_is_found_after_a_video_line() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:v\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\na=mid:a1\r\n";
        assert_eq!(audio_mid(sdp), Some(Mid::from("a1")));
        assert_eq!(
            audio_mid("v=0\r\nm=audio 9 RTP 0\r\nm=video 9 RTP 96\r\na=mid:1\r\n"),
            None
        );
        assert_eq!(audio_mid("garbage"), None);
    }

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
