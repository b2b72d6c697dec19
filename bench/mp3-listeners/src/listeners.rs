//! The listener pool: N non-blocking TCP connections driven by one
//! level-triggered epoll loop on one thread, with a few hundred bytes of
//! state per listener and one shared read buffer.

use std::time::Instant;

use crate::http::{self, Chunked, Ev};
use crate::media::{Format, Media};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Head,
    Body,
    Ended,
}

/// Why a listener stopped (or `None` while it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    None,
    /// socket()/connect() failed with this errno.
    Connect(i32),
    /// The connect (or response head) did not finish in time.
    Timeout,
    /// Non-200 status.
    Status(u16),
    /// Unparsable head, or not the format's Content-Type.
    BadHead,
    /// The server closed the connection (EOF) mid-body.
    Eof,
    /// The chunked body ended (zero-size chunk: stream ended or listener cut).
    LastChunk,
    /// read() failed with this errno (e.g. ECONNRESET).
    Read(i32),
    /// Chunked framing error.
    Framing,
    /// Closed by this tool.
    Closed,
}

/// One listener. Times are ns since the pool's epoch; 0 = not yet.
pub struct Conn {
    pub fd: i32,
    pub state: State,
    pub end: End,
    /// Index of the step that opened it.
    pub step: u16,
    head: Vec<u8>,
    chunked: bool,
    dec: Chunked,
    pub media: Media,
    pub t_start: u64,
    pub t_first_byte: u64,
    pub t_head: u64,
    pub t_first_frame: u64,
    pub t_last_read: u64,
    pub t_end: u64,
    pub burst_ns: u64,
    pub burst_frames: u32,
    burst_known: bool,
    pub body_bytes: u64,
    // Measurement window.
    in_win: bool,
    /// Connected and alive when the last window started.
    pub win_member: bool,
    pub win_first: u64,
    pub win_last: u64,
    win_audio0: u64,
    pub win_audio: u64,
    pub win_max_gap: u64,
}

impl Conn {
    fn new(fd: i32, step: u16, now: u64, format: Format) -> Self {
        Self {
            fd,
            state: State::Connecting,
            end: End::None,
            step,
            head: Vec::new(),
            chunked: false,
            dec: Chunked::default(),
            media: Media::new(format),
            t_start: now,
            t_first_byte: 0,
            t_head: 0,
            t_first_frame: 0,
            t_last_read: 0,
            t_end: 0,
            burst_ns: 0,
            burst_frames: 0,
            burst_known: false,
            body_bytes: 0,
            in_win: false,
            win_member: false,
            win_first: 0,
            win_last: 0,
            win_audio0: 0,
            win_audio: 0,
            win_max_gap: 0,
        }
    }

    pub fn alive(&self) -> bool {
        self.state != State::Ended
    }

    /// Got a 200 head of the format's Content-Type.
    pub fn connected(&self) -> bool {
        self.t_head != 0 && !matches!(self.end, End::Status(_) | End::BadHead)
    }

    /// No bad MP3 header or Ogg page, and no HTTP framing error.
    pub fn intact(&self) -> bool {
        self.media.clean() && self.end != End::Framing
    }

    /// Audio received in the window after its first read, over the time
    /// between the window's first and last read (1.0 = real time).
    pub fn window_ratio(&self) -> f64 {
        if self.win_last <= self.win_first {
            return 0.0;
        }
        self.win_audio as f64 / (self.win_last - self.win_first) as f64
    }

    /// (audio − burst) / time since the first byte: real time since connect.
    pub fn lifetime_ratio(&self, now: u64) -> f64 {
        let end = if self.t_end != 0 { self.t_end } else { now };
        if self.t_first_byte == 0 || end <= self.t_first_byte {
            return 0.0;
        }
        (self.media.audio_ns().saturating_sub(self.burst_ns)) as f64
            / (end - self.t_first_byte) as f64
    }

    /// Feeds body bytes to the decoders. The burst is what the first read
    /// brought (the server writes it at once, as one or several chunks).
    fn body(&mut self, data: &[u8], now: u64) {
        self.body_bytes += data.len() as u64;
        let before = self.media.frames();
        if self.chunked {
            let Conn {
                dec,
                media,
                state,
                end,
                ..
            } = self;
            let ok = dec.feed(data, |ev| match ev {
                Ev::Data(d) => media.feed(d),
                Ev::ChunkEnd => {}
                Ev::End => {
                    *state = State::Ended;
                    *end = End::LastChunk;
                }
            });
            if !ok {
                self.end = End::Framing;
                self.state = State::Ended;
            }
        } else {
            self.media.feed(data);
        }
        if !self.burst_known {
            self.burst_known = true;
            self.burst_ns = self.media.audio_ns();
            self.burst_frames = self.media.frames() as u32;
        }
        if before == 0 && self.media.frames() > 0 {
            self.t_first_frame = now;
        }
    }
}

/// Counters of failures while launching.
#[derive(Default, Debug, Clone)]
pub struct LaunchErrors {
    pub by_errno: Vec<(i32, u64)>,
}

impl LaunchErrors {
    fn add(&mut self, errno: i32) {
        match self.by_errno.iter_mut().find(|(e, _)| *e == errno) {
            Some((_, n)) => *n += 1,
            None => self.by_errno.push((errno, 1)),
        }
    }
}

pub struct Pool {
    epoch: Instant,
    ep: i32,
    events: Vec<libc::epoll_event>,
    buf: Vec<u8>,
    addr: libc::sockaddr_in,
    request: Vec<u8>,
    format: Format,
    pub conns: Vec<Conn>,
    /// Connections in Connecting/Head state.
    pub inflight: usize,
    pub errors: LaunchErrors,
    /// socket() hit EMFILE/ENFILE: stop launching.
    pub fd_exhausted: bool,
    win_start: u64,
    /// x-stream-id of the first good response.
    pub stream_id: Option<String>,
    /// Last body read of any listener.
    last_any_read: u64,
    /// Longest time in the window with no body byte for any listener, and
    /// when it ended (ns since the window start).
    pub win_global_gap: u64,
    pub win_global_gap_end: u64,
    /// Loop health of this tool: epoll_wait calls, how many returned a full
    /// event array (a sign of falling behind), and the longest time spent
    /// handling one batch of events.
    pub polls: u64,
    pub polls_full: u64,
    pub max_batch_ns: u64,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Pool {
    pub fn new(port: u16, host_port: &str, path: &str, format: Format) -> std::io::Result<Self> {
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        Ok(Self {
            epoch: Instant::now(),
            ep,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            buf: vec![0u8; 256 * 1024],
            addr,
            request: http::request(host_port, path),
            format,
            conns: Vec::new(),
            inflight: 0,
            errors: LaunchErrors::default(),
            fd_exhausted: false,
            win_start: 0,
            stream_id: None,
            last_any_read: 0,
            win_global_gap: 0,
            win_global_gap_end: 0,
            polls: 0,
            polls_full: 0,
            max_batch_ns: 0,
        })
    }

    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn ns_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Opens one more listener (non-blocking connect).
    pub fn launch(&mut self, step: u16) {
        let now = self.now();
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            let e = errno();
            if e == libc::EMFILE || e == libc::ENFILE {
                self.fd_exhausted = true;
            }
            self.errors.add(e);
            let mut c = Conn::new(-1, step, now, self.format);
            c.state = State::Ended;
            c.end = End::Connect(e);
            c.t_end = now;
            self.conns.push(c);
            return;
        }
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let rc = unsafe {
            libc::connect(
                fd,
                &self.addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let idx = self.conns.len();
        self.conns.push(Conn::new(fd, step, now, self.format));
        if rc < 0 && errno() != libc::EINPROGRESS {
            let e = errno();
            self.errors.add(e);
            self.finish(idx, End::Connect(e), now);
            return;
        }
        self.inflight += 1;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLIN) as u32,
            u64: idx as u64,
        };
        if unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            let e = errno();
            self.errors.add(e);
            self.finish(idx, End::Connect(e), now);
        }
    }

    fn finish(&mut self, idx: usize, end: End, now: u64) {
        let c = &mut self.conns[idx];
        if matches!(c.state, State::Connecting | State::Head) {
            self.inflight -= 1;
        }
        if c.fd >= 0 {
            unsafe { libc::close(c.fd) };
            c.fd = -1;
        }
        c.state = State::Ended;
        if c.end == End::None {
            c.end = end;
        }
        if c.t_end == 0 {
            c.t_end = now;
        }
    }

    /// Waits up to `timeout_ms` for events and handles them.
    pub fn poll(&mut self, timeout_ms: i32) {
        let n = unsafe {
            libc::epoll_wait(
                self.ep,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n <= 0 {
            return;
        }
        let t0 = Instant::now();
        self.polls += 1;
        if n as usize == self.events.len() {
            self.polls_full += 1;
        }
        for i in 0..n as usize {
            let ev = self.events[i];
            let idx = ev.u64 as usize;
            if idx >= self.conns.len() || self.conns[idx].fd < 0 {
                continue;
            }
            match self.conns[idx].state {
                State::Connecting => self.on_connect(idx),
                State::Head | State::Body => self.on_read(idx),
                State::Ended => {}
            }
        }
        self.max_batch_ns = self.max_batch_ns.max(t0.elapsed().as_nanos() as u64);
    }

    pub fn reset_loop_stats(&mut self) {
        self.polls = 0;
        self.polls_full = 0;
        self.max_batch_ns = 0;
    }

    fn on_connect(&mut self, idx: usize) {
        let now = self.now();
        let fd = self.conns[idx].fd;
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut _ as *mut libc::c_void,
                &mut len,
            );
        }
        if err != 0 {
            self.errors.add(err);
            self.finish(idx, End::Connect(err), now);
            return;
        }
        let w = unsafe {
            libc::write(
                fd,
                self.request.as_ptr() as *const libc::c_void,
                self.request.len(),
            )
        };
        if w != self.request.len() as isize {
            let e = if w < 0 { errno() } else { libc::EIO };
            if e == libc::EAGAIN || e == libc::ENOTCONN {
                return; // not writable yet after all: wait for the next event
            }
            self.errors.add(e);
            self.finish(idx, End::Connect(e), now);
            return;
        }
        self.conns[idx].state = State::Head;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: idx as u64,
        };
        unsafe { libc::epoll_ctl(self.ep, libc::EPOLL_CTL_MOD, fd, &mut ev) };
    }

    fn on_read(&mut self, idx: usize) {
        let fd = self.conns[idx].fd;
        let n = unsafe {
            libc::read(
                fd,
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
            )
        };
        let now = self.now();
        if n < 0 {
            let e = errno();
            if e != libc::EAGAIN && e != libc::EINTR {
                self.finish(idx, End::Read(e), now);
            }
            return;
        }
        if n == 0 {
            self.finish(idx, End::Eof, now);
            return;
        }
        let n = n as usize;
        let win_start = self.win_start;
        let buf = &self.buf[..n];
        let c = &mut self.conns[idx];
        if c.t_first_byte == 0 {
            c.t_first_byte = now;
        }
        let mut head_result: Option<End> = None;
        match c.state {
            State::Head => {
                c.head.extend_from_slice(buf);
                if let Some(end) = http::head_end(&c.head) {
                    let head = std::mem::take(&mut c.head);
                    match http::parse_head(&head[..end]) {
                        Some(h)
                            if h.status == 200
                                && h.content_type.starts_with(self.format.content_type()) =>
                        {
                            if self.stream_id.is_none() {
                                self.stream_id = Some(h.stream_id.clone());
                            }
                            c.t_head = now;
                            c.chunked = h.chunked;
                            c.state = State::Body;
                            self.inflight -= 1;
                            let rest = &head[end..];
                            if !rest.is_empty() {
                                c.body(rest, now);
                            }
                        }
                        Some(h) if h.status != 200 => head_result = Some(End::Status(h.status)),
                        _ => head_result = Some(End::BadHead),
                    }
                } else if c.head.len() > 16 * 1024 {
                    head_result = Some(End::BadHead);
                }
            }
            State::Body => {
                if c.in_win {
                    let from = c.t_last_read.max(win_start);
                    c.win_max_gap = c.win_max_gap.max(now.saturating_sub(from));
                    let global = now.saturating_sub(self.last_any_read.max(win_start));
                    if global > self.win_global_gap {
                        self.win_global_gap = global;
                        self.win_global_gap_end = now - win_start;
                    }
                }
                self.last_any_read = now;
                c.body(buf, now);
            }
            _ => {}
        }
        c.t_last_read = now;
        if c.in_win && c.t_head != 0 {
            if c.win_first == 0 {
                c.win_first = now;
                c.win_audio0 = c.media.audio_ns();
            } else {
                c.win_last = now;
                c.win_audio = c.media.audio_ns() - c.win_audio0;
            }
        }
        if let Some(end) = head_result {
            self.finish(idx, end, now);
        } else if self.conns[idx].state == State::Ended {
            // Body ended (last chunk) or framing error inside `body`.
            let end = self.conns[idx].end;
            self.conns[idx].state = State::Body; // so finish() does not touch inflight
            self.finish(idx, end, now);
        }
    }

    /// Gives up on listeners still connecting or waiting for a head.
    pub fn timeout_inflight(&mut self) {
        let now = self.now();
        for idx in 0..self.conns.len() {
            if matches!(self.conns[idx].state, State::Connecting | State::Head) {
                self.finish(idx, End::Timeout, now);
            }
        }
    }

    /// Starts the measurement window for every live listener.
    pub fn start_window(&mut self) {
        let now = self.now();
        self.win_start = now;
        self.win_global_gap = 0;
        self.win_global_gap_end = 0;
        for c in &mut self.conns {
            c.in_win = c.alive();
            c.win_member = c.alive() && c.state == State::Body;
            c.win_first = 0;
            c.win_last = 0;
            c.win_audio0 = 0;
            c.win_audio = 0;
            c.win_max_gap = 0;
        }
    }

    pub fn win_start(&self) -> u64 {
        self.win_start
    }

    /// Ends the window: counts the silence since each listener's last read
    /// as a gap too. Returns the end time.
    pub fn end_window(&mut self) -> u64 {
        let now = self.now();
        let win_start = self.win_start;
        let tail = now.saturating_sub(self.last_any_read.max(win_start));
        if tail > self.win_global_gap {
            self.win_global_gap = tail;
            self.win_global_gap_end = now - win_start;
        }
        for c in &mut self.conns {
            if c.in_win {
                let until = if c.alive() {
                    now
                } else {
                    c.t_end.max(win_start)
                };
                let from = c.t_last_read.max(win_start);
                c.win_max_gap = c.win_max_gap.max(until.saturating_sub(from));
                c.in_win = false;
            }
        }
        now
    }

    /// Closes every listener with an RST (SO_LINGER 0: no TIME_WAIT, so the
    /// ephemeral ports are free for the next step at once).
    pub fn close_all(&mut self) {
        let now = self.now();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        for idx in 0..self.conns.len() {
            let fd = self.conns[idx].fd;
            if fd >= 0 {
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        &linger as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                self.finish(idx, End::Closed, now);
            }
        }
    }

    pub fn alive_count(&self) -> usize {
        self.conns.iter().filter(|c| c.alive()).count()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close_all();
        unsafe { libc::close(self.ep) };
    }
}
