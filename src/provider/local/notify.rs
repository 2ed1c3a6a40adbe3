//! Readiness notification with systemd's `sd_notify` protocol: a starting instance gets the
//! path of a datagram socket of its own in `NOTIFY_SOCKET`, and is ready once it sends a
//! datagram with a `READY=1` line there.
//!
//! The socket is a file in a directory of its own that only wakegate's user can enter, both
//! removed when the start ends: a path, because every `sd_notify` client takes one (not all
//! take an abstract `@name`). A datagram counts only when its sender, as the kernel reports
//! it (`SO_PASSCRED`), is the instance's process or another process of its process group (the
//! instance leads a group of its own). A helper that has already exited when its datagram is
//! read cannot be placed in a group, and is ignored.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// The largest notification read; systemd reads no more either (`PIPE_BUF`).
const MAX_DATAGRAM: usize = 4096;

/// One starting instance's notification socket; removed with its directory when dropped.
pub struct NotifySocket {
    socket: UnixDatagram,
    /// The private directory holding the socket.
    dir: PathBuf,
    /// The `NOTIFY_SOCKET` value.
    path: PathBuf,
}

impl NotifySocket {
    pub fn bind() -> io::Result<NotifySocket> {
        // Unguessable, and created here or not at all, so nobody else can have prepared it.
        let dir = std::env::temp_dir().join(format!(
            "wakegate-notify-{}-{:016x}",
            std::process::id(),
            RandomState::new().hash_one(std::time::SystemTime::now())
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("notify");
        match bind_with_credentials(&path) {
            Ok(socket) => Ok(NotifySocket { socket, dir, path }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves once the process `instance`, or one of its process group, sends `READY=1`.
    /// Other lines (`STATUS=...`, `MAINPID=...`) and other senders are ignored.
    pub async fn ready(&self, instance: u32) -> io::Result<()> {
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            let received = self
                .socket
                .async_io(Interest::READABLE, || {
                    recv_with_sender(self.socket.as_fd(), &mut buf)
                })
                .await?;
            let Some(Received { len, sender }) = received else {
                continue;
            };
            if !buf[..len]
                .split(|&b| b == b'\n')
                .any(|line| line == b"READY=1")
            {
                continue;
            }
            if sender.is_some_and(|pid| in_group_of(pid, instance)) {
                return Ok(());
            }
            tracing::warn!(
                sender = sender.unwrap_or_default(),
                instance,
                "ignored READY=1 from a process outside the instance's process group"
            );
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A datagram socket at `path` that receives each sender's credentials with its datagrams.
fn bind_with_credentials(path: &Path) -> io::Result<UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::bind(path)?;
    socket.set_nonblocking(true)?;
    socket2::SockRef::from(&socket).set_passcred(true)?;
    UnixDatagram::from_std(socket)
}

struct Received {
    len: usize,
    /// The sending process, as the kernel reports it.
    sender: Option<libc::pid_t>,
}

/// True when `pid` is `instance` or in its process group, which the instance leads.
fn in_group_of(pid: libc::pid_t, instance: u32) -> bool {
    let Ok(instance) = libc::pid_t::try_from(instance) else {
        return false;
    };
    // SAFETY: getpgid only reads another process's group id.
    pid > 0 && (pid == instance || unsafe { libc::getpgid(pid) } == instance)
}

/// Reads one datagram and the credentials the kernel attached to it; `None` for a datagram
/// too large to be a notification.
fn recv_with_sender(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // Room for the credentials only: file descriptors a sender passes along (FDSTORE=1) do
    // not fit, and the kernel closes them instead of handing them over.
    const CONTROL: usize =
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        unsafe { libc::CMSG_SPACE(size_of::<libc::ucred>() as u32) } as usize;
    // u64s: the control buffer must be aligned for `cmsghdr`.
    let mut control = [0u64; CONTROL.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points at a live buffer of the stated length.
    let len = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Ok(None);
    }
    let mut sender = None;
    // SAFETY: the kernel filled `control` and set `msg_controllen`; the CMSG_* functions walk
    // the headers within those bounds, and the credentials are read unaligned.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET
                && (*header).cmsg_type == libc::SCM_CREDENTIALS
            {
                let creds = libc::CMSG_DATA(header)
                    .cast::<libc::ucred>()
                    .read_unaligned();
                sender = Some(creds.pid);
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    Ok(Some(Received {
        len: len as usize,
        sender,
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    /// Sends `message` to the socket from this process, as an instance would.
    fn send(socket: &NotifySocket, message: &str) {
        std::os::unix::net::UnixDatagram::unbound()
            .unwrap()
            .send_to(message.as_bytes(), socket.path())
            .unwrap();
    }

    async fn resolves(socket: &NotifySocket, instance: u32) -> bool {
        let wait = std::time::Duration::from_millis(200);
        tokio::time::timeout(wait, socket.ready(instance))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    #[tokio::test]
    async fn ready_resolves_on_a_ready_line_among_others() {
        let socket = NotifySocket::bind().unwrap();
        send(&socket, "STATUS=loading");
        send(&socket, "STATUS=up\nREADY=1\nMAINPID=1");
        assert!(resolves(&socket, std::process::id()).await);
    }

    #[tokio::test]
    async fn other_messages_do_not_make_an_instance_ready() {
        let socket = NotifySocket::bind().unwrap();
        send(&socket, "STATUS=READY=1");
        send(&socket, "READY=0");
        send(&socket, "READY=1x");
        assert!(!resolves(&socket, std::process::id()).await);
    }

    #[tokio::test]
    async fn ready_from_a_process_outside_the_instance_group_is_ignored() {
        let socket = NotifySocket::bind().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("10")
            .process_group(0)
            .spawn()
            .unwrap();
        send(&socket, "READY=1");
        let resolved = resolves(&socket, other.id()).await;
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(
            !resolved,
            "this test process is not in the group of pid {}",
            other.id()
        );
    }

    #[tokio::test]
    async fn each_socket_has_a_private_directory_removed_with_it() {
        use std::os::unix::fs::PermissionsExt;

        let (a, b) = (NotifySocket::bind().unwrap(), NotifySocket::bind().unwrap());
        assert_ne!(a.path(), b.path());
        let dir = a.path().parent().unwrap().to_owned();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "only wakegate's user may enter {dir:?}"
        );
        assert!(a.path().exists());
        drop(a);
        assert!(!dir.exists(), "{dir:?} is removed with the socket");
    }
}
