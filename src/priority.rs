//! Thread priorities: forwarding audio is the one job whose delay every
//! WebRTC receiver hears, MP3 encoding the one whose delay players buffer
//! away. The media relay thread (and the forwarding threads it starts, which
//! inherit it) asks for nice −10; each MP3 pipeline thread takes nice 19.
//! Raising needs root or `CAP_SYS_NICE`; without it the relay keeps the
//! default and says so.

/// Nice value asked for the media relay thread.
const MEDIA_RELAY_NICE: libc::c_int = -10;
/// Nice value of an MP3 pipeline thread.
const MP3_NICE: libc::c_int = 19;

/// Called on the media relay thread when it starts.
pub fn for_media_relay() {
    match set_nice(MEDIA_RELAY_NICE) {
        Ok(()) => tracing::info!(
            nice = MEDIA_RELAY_NICE,
            "media relay thread priority raised"
        ),
        Err(e) => tracing::info!(error = %e, "media relay thread keeps the default priority"),
    }
}

/// Called on an MP3 pipeline thread when it starts (lowering always works).
pub fn for_mp3_pipeline() {
    let _ = set_nice(MP3_NICE);
}

/// Sets the calling thread's nice value (on Linux, nice is per thread).
fn set_nice(nice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: plain syscalls on the calling thread.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
