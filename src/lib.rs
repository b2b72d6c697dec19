//! Voice relay: WebRTC (Opus) in, WebRTC and live MP3 out.
//!
//! Arrows point one way: `signalling` and `http` talk to the `registry`; the
//! `relay` owns the UDP socket and the peers; `mp3` turns a stream into MP3
//! frames for HTTP listeners; `icecast` pushes streams to Icecast servers,
//! each push a listener of the stream like an HTTP one.

pub mod access;
pub mod backoff;
pub mod config;
pub mod http;
pub mod http_client;
pub mod ice_servers;
pub mod icecast;
pub mod liveness;
pub mod metrics;
pub mod mp3;
pub mod ogg_opus;
pub mod options;
pub mod priority;
pub mod probe;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod signalling;
pub mod sync;
pub mod tls;
pub mod web;
pub mod whip;
pub mod whip_push;
