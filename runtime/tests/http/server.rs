//! Starts a real `baleen-runtime serve` process on 127.0.0.1 with a free port, and stops it when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use baleen_api::names::RUNTIME_LISTENING_PREFIX;

const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// Lines printed on stdout after the listening line (the final JSON object).
    stdout_rest: mpsc::Receiver<String>,
    /// Every line written on stderr so far (also copied to the test's stderr).
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `serve --model builtin:tiny-moe` with a small KV cache, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_logging(extra, "warn")
    }

    /// [`Server::start`] with `BALEEN_RUNTIME_LOG` set to `filter`.
    pub fn start_logging(extra: &[&str], filter: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baleen-runtime"))
            .args(["serve", "--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "0"])
            .args(["--kv-cache-memory", "64MiB"])
            .args(extra)
            .env("BALEEN_RUNTIME_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning baleen-runtime serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("{line}");
                kept.lock().unwrap().push(line);
            }
        });
        let (first_tx, first_rx) = mpsc::channel();
        let (rest_tx, rest_rx) = mpsc::channel();
        // Keep reading stdout until the process exits, so its last line never meets a closed pipe.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_tx.send(lines.next());
            for line in lines.map_while(Result::ok) {
                let _ = rest_tx.send(line);
            }
        });
        let line = match first_rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!("serve printed no listening line: {other:?} (status {:?})", child.wait());
            }
        };
        let addr = line
            .strip_prefix(RUNTIME_LISTENING_PREFIX)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        Server { child, addr, stdout_rest: rest_rx, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("waiting for serve") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The lines written on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The lines printed on stdout after the listening line (complete once the process has exited).
    pub fn stdout_after_listening(&self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.stdout_rest.recv_timeout(Duration::from_secs(2)) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
