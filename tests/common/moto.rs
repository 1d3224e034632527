//! A moto S3 server (the Python package `moto[server]==5.2.5`) on a free loopback port, for the
//! remote-cache tests and benchmark: started by [`Moto::start`], stopped when dropped.
//!
//! moto is run by the `python3` on `PATH` when that has it (`.ci/run` sees to it); otherwise it
//! is installed once from PyPI into a virtual environment under cargo's target folder (about
//! 30 s), so that `cargo test --workspace --all-features` works on a fresh machine with Python.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The moto release the tests are written against.
const MOTO: &str = "moto[server]==5.2.5";

/// A Python that has moto 5.2.5 and boto3: the `python3` on `PATH`, else the one of a virtual
/// environment made once under the target folder.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let on_path = PathBuf::from("python3");
        if has_moto(&on_path) {
            return on_path;
        }
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
        let python = venv.join("bin").join("python3");
        if !has_moto(&python) {
            install(&venv);
        }
        assert!(
            has_moto(&python),
            "{MOTO} is not importable by {}",
            python.display()
        );
        python
    })
}

fn has_moto(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            "import boto3, moto, sys; sys.exit(moto.__version__ != '5.2.5')",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Makes the virtual environment aside and renames it into place, so that test binaries running
/// at once never use half of one (the loser of a race throws its copy away).
fn install(venv: &Path) {
    let aside = venv.with_file_name(format!("moto-venv-{}", std::process::id()));
    let _ = fs::remove_dir_all(&aside);
    let run = |command: &mut Command| {
        let status = command.status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "installing {MOTO} for the remote-cache tests: {command:?} failed ({status:?}); \
             install it by hand (pip install '{MOTO}') or run .ci/run"
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&aside));
    run(Command::new(aside.join("bin").join("python3")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        MOTO,
    ]));
    if fs::rename(&aside, venv).is_err() {
        let _ = fs::remove_dir_all(&aside);
    }
}

/// The bucket every server is started with.
pub const BUCKET: &str = "memo-test";

/// A running server, stopped when dropped.
pub struct Moto {
    child: std::sync::Mutex<Option<Child>>,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // `python -m moto.server` is `moto_server`, without relying on its script's first line.
        let child = Command::new(python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto ({e})"));
        let moto = Moto {
            child: std::sync::Mutex::new(Some(child)),
            port,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto.create_bucket();
        moto
    }

    /// `PUT /<bucket>`: moto accepts it without a signature.
    fn create_bucket(&self) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A remote cache on this server's bucket, below `prefix`, configured in code.
    pub fn config(&self, prefix: &str) -> memo::remote::RemoteConfig {
        memo::remote::RemoteConfig::new(format!("s3://{BUCKET}/{prefix}"))
            .option("aws_endpoint", self.endpoint())
            .option("aws_allow_http", "true")
            .option("aws_access_key_id", "test")
            .option("aws_secret_access_key", "test")
            .option("aws_region", "us-east-1")
    }

    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
