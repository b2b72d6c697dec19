//! The audio format the listeners parse: owns the choice ([`Format`]: MP3
//! frames or Ogg/Opus pages), what a server must answer for it, and the
//! per-listener parser behind one interface ([`Media`]).

use clap::ValueEnum;

use crate::mp3::Mp3Parser;
use crate::ogg::OggParser;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `audio/mpeg`: MPEG audio frames, time from frame durations.
    Mp3,
    /// `audio/ogg`: Ogg/Opus pages, time from granule positions.
    Ogg,
}

impl Format {
    /// The Content-Type a listener's response must have.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Mp3 => "audio/mpeg",
            Format::Ogg => "audio/ogg",
        }
    }

    /// The URL path's extension voice-relay serves this format at.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Mp3 => ".mp3",
            Format::Ogg => ".ogg",
        }
    }

    /// The /health key counting this format's listeners.
    pub fn health_key(self) -> &'static str {
        match self {
            Format::Mp3 => "mp3_listeners",
            Format::Ogg => "ogg_listeners",
        }
    }
}

/// One listener's parser.
#[derive(Debug)]
pub enum Media {
    Mp3(Mp3Parser),
    Ogg(OggParser),
}

impl Media {
    pub fn new(format: Format) -> Self {
        match format {
            Format::Mp3 => Media::Mp3(Mp3Parser::for_listener()),
            Format::Ogg => Media::Ogg(OggParser::default()),
        }
    }

    /// Feeds body bytes.
    pub fn feed(&mut self, data: &[u8]) {
        match self {
            Media::Mp3(p) => p.feed(data),
            Media::Ogg(p) => p.feed(data),
        };
    }

    /// Whole media units: MP3 frames, or Ogg audio pages.
    pub fn frames(&self) -> u64 {
        match self {
            Media::Mp3(p) => p.frames,
            Media::Ogg(p) => p.frames,
        }
    }

    /// Audio time received so far.
    pub fn audio_ns(&self) -> u64 {
        match self {
            Media::Mp3(p) => p.audio_ns,
            Media::Ogg(p) => p.audio_ns(),
        }
    }

    /// True while nothing broken was seen.
    pub fn clean(&self) -> bool {
        match self {
            Media::Mp3(p) => p.clean(),
            Media::Ogg(p) => p.clean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of these per listener, thousands per step: keep it small.
    #[test]
    fn listener_parser_stays_small() {
        assert!(
            std::mem::size_of::<Media>() <= 96,
            "{}",
            std::mem::size_of::<Media>()
        );
    }

    #[test]
    fn each_format_gets_its_parser() {
        assert!(matches!(Media::new(Format::Mp3), Media::Mp3(_)));
        let mut ogg = Media::new(Format::Ogg);
        ogg.feed(b"not a page");
        assert!(!ogg.clean(), "garbage is a broken Ogg stream");
        assert_eq!((ogg.frames(), ogg.audio_ns()), (0, 0));
    }
}
