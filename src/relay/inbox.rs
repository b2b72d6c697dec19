//! Incoming datagrams of the relay, each with the instant the kernel received
//! it (`SO_TIMESTAMPNS`), so that time spent waiting in the socket buffer
//! while the relay was busy counts in the latency it reports. `recvmsg(2)`
//! stays a raw call: the timestamp comes as a control message, which the
//! standard library and socket2 do not read.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::SockAddr;

/// Asks the kernel to stamp every datagram received on `fd`. The first socket
/// of the system to ask turns stamping on asynchronously: datagrams in the
/// first moments may be stamped when read instead.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a valid fd with a pointer to a live c_int and
    // its size. (socket2 has no setter for SO_TIMESTAMPNS.)
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one datagram into `buf`: its length, source, and when the kernel
/// received it (now, if the socket gave no timestamp).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Instant)> {
    // SAFETY: socket2 hands us zeroed address storage and its length;
    // recvmsg fills both, and they tell socket2 the family and size. The
    // zeroed iovec / msghdr / control buffer are valid empty values; every
    // pointer stored in `msg` points to a local that outlives the call, with
    // its true length.
    let ((n, arrived), source) = unsafe {
        SockAddr::try_init(|storage, len| {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // Room for one timespec control message, 8-byte aligned.
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = storage as *mut libc::c_void;
            msg.msg_namelen = *len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = size_of::<[u64; 8]>() as _;
            let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            *len = msg.msg_namelen;
            Ok((n as usize, kernel_timestamp(&msg)))
        })?
    };
    let source = source
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from an unknown address family"))?;
    Ok((n, source, arrived.unwrap_or_else(Instant::now)))
}

/// The receive timestamp among a received message's control messages.
///
/// # Safety
/// `msg` was filled by `recvmsg`, and its control buffer is still alive.
unsafe fn kernel_timestamp(msg: &libc::msghdr) -> Option<Instant> {
    let mut arrived = None;
    let mut cmsg = libc::CMSG_FIRSTHDR(msg);
    while !cmsg.is_null() {
        let c = &*cmsg;
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
            let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
            arrived = Some(instant_of(ts));
        }
        cmsg = libc::CMSG_NXTHDR(msg, cmsg);
    }
    arrived
}

/// The monotonic instant of a wall-clock kernel timestamp: now minus its age.
fn instant_of(ts: libc::timespec) -> Instant {
    let stamped = UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    let age = SystemTime::now()
        .duration_since(stamped)
        .unwrap_or(Duration::ZERO);
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn receives_with_source_and_kernel_time() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_timestamps(rx.as_raw_fd()).unwrap();
        // The first socket to ask makes the kernel turn receive stamping on
        // from a work queue; until then it stamps a datagram when it is read.
        std::thread::sleep(Duration::from_millis(200));
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = Instant::now();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 64];
        let (n, source, arrived) = recv(rx.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(source, tx.local_addr().unwrap());
        // Stamped on arrival, not when read 300 ms later (wide slack: the
        // conversion reads two clocks, and a loaded test run can preempt it).
        assert!(
            arrived + Duration::from_millis(100) >= before,
            "{arrived:?} vs {before:?}"
        );
        assert!(
            arrived.elapsed() >= Duration::from_millis(150),
            "{:?}",
            arrived.elapsed()
        );
        let err = recv(rx.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
