//! A real nginx for tests, on a loopback port, with its own prefix.
//!
//! [`Nginx::start`] writes a config into a temporary directory (pid file,
//! logs and temp paths all inside it), serves `root` on `127.0.0.1:PORT` and
//! waits until the port accepts connections. nginx runs in the foreground as
//! one process (`master_process off`), so [`Nginx::stop`] is a kill that
//! cuts every connection at once — an outage, not a graceful shutdown — and
//! [`Nginx::start_again`] brings the same server back on the same port. The
//! access log records, per request, the connection number and how many
//! requests that connection has served, so tests can see connection reuse.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The nginx binary: `$DS_NGINX` or `/usr/sbin/nginx`.
pub fn nginx_binary() -> PathBuf {
    std::env::var_os("DS_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// A running (or stopped) nginx serving one directory.
#[derive(Debug)]
pub struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    scheme: &'static str,
}

impl Nginx {
    /// Serves `root` with `extra` added to the `server` block (e.g.
    /// `max_ranges 0;`).
    pub fn start(root: &Path, extra: &str) -> io::Result<Nginx> {
        Nginx::start_with(root, extra, None)
    }

    /// [`Nginx::start`] serving HTTPS with `cert` and `key` (PEM files).
    pub fn start_tls(root: &Path, extra: &str, cert: &Path, key: &Path) -> io::Result<Nginx> {
        Nginx::start_with(root, extra, Some((cert, key)))
    }

    fn start_with(root: &Path, extra: &str, tls: Option<(&Path, &Path)>) -> io::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        // Reserve a port by binding it, then hand it to nginx.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.path().display();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.path().join("tmp").join(t))?;
        }
        let conf = format!(
            "daemon off;\n\
             master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n\
               log_format ds '$request_method $uri $status $connection $connection_requests \
                              \"$http_range\"';\n\
               access_log {d}/access.log ds;\n\
               client_body_temp_path {d}/tmp/body;\n\
               proxy_temp_path {d}/tmp/proxy;\n\
               fastcgi_temp_path {d}/tmp/fastcgi;\n\
               uwsgi_temp_path {d}/tmp/uwsgi;\n\
               scgi_temp_path {d}/tmp/scgi;\n\
               default_type application/octet-stream;\n\
               keepalive_requests 100000;\n\
               server {{\n\
                 listen 127.0.0.1:{port}{ssl};\n\
                 root {root};\n\
                 {extra}\n\
               }}\n\
             }}\n",
            root = root.display(),
            ssl = match tls {
                Some((cert, key)) => format!(
                    " ssl;\n ssl_certificate {};\n ssl_certificate_key {}",
                    cert.display(),
                    key.display()
                ),
                None => String::new(),
            },
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let mut n = Nginx {
            dir,
            port,
            child: None,
            scheme: if tls.is_some() { "https" } else { "http" },
        };
        n.start_again()?;
        Ok(n)
    }

    /// Starts the server again (after [`Nginx::stop`]) on the same port and
    /// waits until it accepts connections.
    pub fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let p = self.dir.path();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // Bounded: 500 tries of 20 ms.
        for _ in 0..500 {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "nginx exited with {status}: {}",
                    self.error_log()
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(io::Error::other("nginx did not start listening"))
    }

    /// Kills the server: open connections are cut.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/NAME` (`https` when started with TLS).
    pub fn url(&self, name: &str) -> String {
        format!("{}://127.0.0.1:{}/{name}", self.scheme, self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
