//! The remote tier: one cache shared by many machines through an object store (S3 and
//! S3-compatible servers; Google Cloud Storage and Azure with the `remote-gcp` and `remote-azure`
//! features), with the local folder kept in front of it.
//!
//! - Reads go to the local folder first; a local miss reads the remote object, checks it (header,
//!   key, checksum, and the MAC when a secret is set) and copies it into the local folder, so the
//!   next hit is a local read.
//! - Writes go to both. The remote write is a conditional create (`If-None-Match: *`); an entry
//!   already there is replaced (conditionally on being the one read) only when it is broken or
//!   older than the new one (a recompute, an expired entry), so an entry is never torn or mixed.
//! - A miss claims its key across machines with a lease object, created conditionally and
//!   renewed while the value is computed; others wait for the value, or take the lease over
//!   (`If-Match` on the expired lease) once it has expired without renewal.
//! - A remote store that fails (down, unreachable, timing out) is left alone for a while, with one
//!   warning: memo goes on with the local folder only. In strict mode, the failure is an error.
//!
//! The remote layout mirrors the local one (see `docs/FORMAT.md` and `docs/REMOTE.md`):
//! `<prefix>/v1/<function>/<version>/<kk>/<key>` holds an entry (plus a 32-byte MAC when written
//! with a secret), `<key>.lease` the lease of a key being computed, `source.rs` the source text.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};

use crate::entry::{self, HEADER_LEN};
use crate::error::Error;
use crate::inventory::{EntryInfo, Listed};
use crate::lock::{Acquired, KeyLock};
use crate::store::{
    assemble_listing, decode_hex_key, plain_name, Cleanup, DirStore, EntryAddress, EntryBytes,
    ListedVersion, Store, VerifyReport, LAYOUT_DIR, SOURCE_FILE, VERSION_DIR_DIGITS,
};

/// Environment variable holding the shared secret that authenticates remote entries (see
/// [`RemoteConfig::secret`]).
pub const MEMO_SECRET: &str = "MEMO_SECRET";
/// Environment variable setting the lease of a remote cache, in seconds (see
/// [`RemoteConfig::lease`]).
pub const MEMO_LEASE: &str = "MEMO_LEASE";
/// Environment variable setting the time limit of one request to a remote store, in seconds
/// (see [`RemoteConfig::timeout`]).
pub const MEMO_REMOTE_TIMEOUT: &str = "MEMO_REMOTE_TIMEOUT";
/// Environment variable naming the local folder in front of a remote store (default:
/// [`Memory::default_location`](crate::Memory::default_location)).
pub const MEMO_LOCAL_DIR: &str = "MEMO_LOCAL_DIR";
/// How long a lease on a key being computed lasts without renewal, by default. The holder
/// renews it every third of this while it computes, so only a machine that died (or lost the
/// network) for this long loses its lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// The default time limit of one request to the remote store.
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a failed request is retried, by default (with exponential back-off).
pub const DEFAULT_REMOTE_RETRIES: usize = 3;
/// How long memo works with the local folder only after the remote store failed, by default.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The default size limit of the local folder in front of a remote store: 10 GiB.
pub const DEFAULT_LOCAL_LIMIT: u64 = 10 << 30;

/// Length of the MAC that follows an entry written with a secret.
pub const MAC_LEN: usize = 32;
const LEASE_SUFFIX: &str = ".lease";
/// Concurrent requests of listings and verifications.
const CONCURRENT: usize = 16;

/// Where and how a remote cache lives: build one, then [`RemoteConfig::build`] the
/// [`Memory`](crate::Memory).
///
/// ```no_run
/// use std::time::Duration;
/// use memo_runtime::remote::RemoteConfig;
///
/// // Credentials, region and endpoint come from the usual AWS_* environment variables.
/// let memory = RemoteConfig::new("s3://my-bucket/team-cache")
///     .local_dir("/scratch/memo")
///     .lease(Duration::from_secs(120))
///     .build()
///     .expect("a valid remote cache");
/// assert_eq!(memory.remote_url(), Some("s3://my-bucket/team-cache"));
/// ```
#[derive(Clone)]
pub struct RemoteConfig {
    url: String,
    local_dir: Option<PathBuf>,
    secret: Option<Vec<u8>>,
    lease: Duration,
    timeout: Duration,
    retries: usize,
    retry_after: Duration,
    local_limit: Option<u64>,
    options: Vec<(String, String)>,
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("local_dir", &self.local_dir)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("lease", &self.lease)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl RemoteConfig {
    /// A remote cache at `url`: `s3://bucket/prefix` (S3 and S3-compatible servers), `gs://` or
    /// `az://` with the matching features. Credentials, region and endpoint are read from the
    /// provider's standard environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...), then from [`RemoteConfig::option`].
    pub fn new(url: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into().trim_end_matches('/').to_owned(),
            local_dir: None,
            secret: None,
            lease: DEFAULT_LEASE,
            timeout: DEFAULT_REMOTE_TIMEOUT,
            retries: DEFAULT_REMOTE_RETRIES,
            retry_after: DEFAULT_RETRY_AFTER,
            local_limit: Some(DEFAULT_LOCAL_LIMIT),
            options: Vec::new(),
        }
    }

    /// [`RemoteConfig::new`] with the settings the environment gives: [`MEMO_LOCAL_DIR`],
    /// [`MEMO_SECRET`], [`MEMO_LEASE`] and [`MEMO_REMOTE_TIMEOUT`].
    pub fn from_env(url: impl Into<String>) -> Self {
        let mut config = RemoteConfig::new(url);
        if let Some(dir) = std::env::var_os(MEMO_LOCAL_DIR).filter(|d| !d.is_empty()) {
            config = config.local_dir(dir);
        }
        if let Some(secret) = std::env::var_os(MEMO_SECRET).filter(|s| !s.is_empty()) {
            config = config.secret(secret.as_encoded_bytes());
        }
        if let Some(lease) = seconds_from_env(MEMO_LEASE, DEFAULT_LEASE) {
            config = config.lease(lease);
        }
        if let Some(timeout) = seconds_from_env(MEMO_REMOTE_TIMEOUT, DEFAULT_REMOTE_TIMEOUT) {
            config = config.timeout(timeout);
        }
        config
    }

    /// The local folder in front of the remote store (default: [`MEMO_LOCAL_DIR`], else `remote`
    /// in [`Memory::default_location`](crate::Memory::default_location), apart from the
    /// entries of local caches there).
    pub fn local_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.local_dir = Some(dir.into());
        self
    }

    /// Authenticates entries with a secret shared by the machines: each entry written is
    /// followed by a MAC of its bytes (keyed BLAKE3, with a key derived from the secret), and an
    /// entry read from the remote store is used only when its MAC is right. A machine that can
    /// write to the bucket but does not know the secret cannot plant a result. Default: none
    /// (entries are still checked by their checksum).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(secret.as_ref().to_vec());
        self
    }

    /// How long a lease on a key being computed lasts without renewal (default:
    /// [`DEFAULT_LEASE`]; at least 300 ms, at most a day). Machines' clocks must agree to well
    /// within this.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.clamp(Duration::from_millis(300), Duration::from_secs(86_400));
        self
    }

    /// The time limit of one request (default: [`DEFAULT_REMOTE_TIMEOUT`]; at least 100 ms, at
    /// most an hour). Retries of a request stop after twice this.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.clamp(Duration::from_millis(100), Duration::from_secs(3600));
        self
    }

    /// How many times a failed request is retried (default: [`DEFAULT_REMOTE_RETRIES`]).
    pub fn retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// How long memo works with the local folder only after a remote failure before it tries
    /// the remote store again, with one request (default: [`DEFAULT_RETRY_AFTER`]; at most a
    /// day).
    pub fn retry_after(mut self, pause: Duration) -> Self {
        self.retry_after = pause.min(Duration::from_secs(86_400));
        self
    }

    /// The size limit of the local folder, in bytes (`None`: unbounded; default:
    /// [`DEFAULT_LOCAL_LIMIT`]). Entries evicted locally stay in the remote store.
    pub fn local_limit(mut self, bytes: Option<u64>) -> Self {
        self.local_limit = bytes;
        self
    }

    /// A setting of the object store client, by its `object_store` configuration name (e.g.
    /// `aws_endpoint`, `aws_allow_http`, `aws_region`); overrides the environment.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// The URL of the remote store.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The [`Memory`](crate::Memory) with this remote store behind its local folder; an error
    /// names what is wrong with the URL or a setting.
    pub fn build(self) -> Result<crate::Memory, Error> {
        crate::Memory::remote(self)
    }

    /// The tiered store: the local folder (with its limit) in front of the remote store.
    pub(crate) fn open(self) -> Result<Tiered, Error> {
        let local_dir = self
            .local_dir
            .clone()
            .unwrap_or_else(|| crate::Memory::default_location().join("remote"));
        let local_limit = self.local_limit;
        let remote = RemoteStore::open(self)?;
        Ok(Tiered {
            local: Arc::new(DirStore::new(local_dir.clone())),
            local_dir,
            local_limit,
            fetched_since_check: AtomicU64::new(0),
            remote: Arc::new(remote),
        })
    }
}

/// A duration in seconds from the environment variable `name`; a value that is not a positive
/// number of seconds is warned about and ignored (`default` stays).
fn seconds_from_env(name: &str, default: Duration) -> Option<Duration> {
    let text = std::env::var(name).ok().filter(|t| !t.trim().is_empty())?;
    match text.trim().parse::<f64>() {
        Ok(secs) if secs > 0.0 => Duration::try_from_secs_f64(secs).ok(),
        _ => {
            crate::log::warn(&format!(
                "{name}={text:?} is not a positive number of seconds; using {default:?}"
            ));
            None
        }
    }
}

fn config_error(message: String) -> Error {
    Error::Config { message }
}

/// The object store client, its runtime and the state of the connection.
pub(crate) struct RemoteStore {
    objects: Arc<dyn ObjectStore>,
    /// `<prefix>/v1`.
    root: ObjectPath,
    /// The URL, as given (no trailing `/`).
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
    mac_key: Option<[u8; 32]>,
    lease: Duration,
    retry_after: Duration,
    /// Who takes leases: host, process and a random part.
    owner: String,
    /// Until when the remote store is left alone after a failure.
    down_until: Mutex<Option<Instant>>,
    /// Whether the current outage was warned about (cleared by a success).
    warned: AtomicBool,
    strict: AtomicBool,
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        // Never blocks, so a store dropped inside an async runtime does not panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What a remote failure is: the object's state (absent, present, changed since read), with
/// the server's word, or an outage.
enum Failure {
    NotFound(String),
    AlreadyExists(String),
    Changed(String),
    Outage(Error),
}

impl RemoteStore {
    fn open(config: RemoteConfig) -> Result<Self, Error> {
        let url = config.url.clone();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            config_error(format!("`{url}` is not a URL (scheme://bucket/prefix)"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(config_error(format!("`{url}` names no bucket")));
        }
        // Timeouts as settings, so that the environment's client settings (AWS_ALLOW_HTTP, ...)
        // are kept, and the user's options come last.
        let mut settings = vec![
            (
                "timeout".to_owned(),
                format!("{}ms", config.timeout.as_millis()),
            ),
            (
                "connect_timeout".to_owned(),
                format!(
                    "{}ms",
                    config.timeout.min(Duration::from_secs(5)).as_millis()
                ),
            ),
        ];
        settings.extend(config.options.iter().cloned());
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: config.retries,
            retry_timeout: config.timeout.saturating_mul(2),
        };
        let bucket_url = format!("{scheme}://{bucket}");
        let bad = |e: object_store::Error| config_error(format!("remote store `{url}`: {e}"));
        // The same settings for every provider's builder.
        macro_rules! configured {
            ($builder:expr) => {{
                let mut builder = $builder.with_url(bucket_url).with_retry(retry);
                for (key, value) in &settings {
                    builder = builder.with_config(key.parse().map_err(bad)?, value);
                }
                Arc::new(builder.build().map_err(bad)?)
            }};
        }
        let objects: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => configured!(object_store::aws::AmazonS3Builder::from_env()),
            #[cfg(feature = "remote-gcp")]
            "gs" => configured!(object_store::gcp::GoogleCloudStorageBuilder::from_env()),
            #[cfg(feature = "remote-azure")]
            "az" | "abfs" | "abfss" | "azure" => {
                configured!(object_store::azure::MicrosoftAzureBuilder::from_env())
            }
            other => {
                return Err(config_error(format!(
                    "`{url}`: memo has no remote store for `{other}://` (s3:// is built in with \
                     the `remote` feature, gs:// with `remote-gcp`, az:// with `remote-azure`)"
                )))
            }
        };
        let prefix = prefix.trim_matches('/');
        let root = if prefix.is_empty() {
            LAYOUT_DIR.to_owned()
        } else {
            format!("{prefix}/{LAYOUT_DIR}")
        };
        let root = ObjectPath::parse(&root).map_err(|e| {
            config_error(format!(
                "`{url}`: the prefix is not a valid object path: {e}"
            ))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("memo-remote")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the remote store's threads for", &url, e))?;
        let mac_key = config
            .secret
            .as_ref()
            .map(|secret| blake3::derive_key("memo remote entry MAC v1", secret));
        // Unique per store: two stores of one process (two `Memory` values) are two owners.
        static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nth = STORES.fetch_add(1, Ordering::Relaxed);
        let nonce = blake3::hash(format!("{:?} {nth}", SystemTime::now()).as_bytes());
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
        Ok(RemoteStore {
            objects,
            root,
            url,
            runtime: Some(runtime),
            mac_key,
            lease: config.lease,
            retry_after: config.retry_after,
            owner: format!("{host}:{}:{}", std::process::id(), &nonce.to_hex()[..8]),
            down_until: Mutex::new(None),
            warned: AtomicBool::new(false),
            strict: AtomicBool::new(false),
        })
    }

    /// Runs a request on the store's runtime and waits for it (from any thread, also inside
    /// another async runtime: the calling thread only waits on a channel).
    fn run<T, F>(&self, request: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| self.error("using", "the store is shut down"))?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = sender.send(request.await);
        });
        receiver
            .recv()
            .map_err(|_| self.error("waiting for", "the request was cancelled"))
    }

    fn error(&self, action: &'static str, message: impl fmt::Display) -> Error {
        Error::Remote {
            action,
            location: self.url.clone(),
            message: message.to_string(),
        }
    }

    /// Sorts an object store error into the object's state or an outage.
    fn classify(&self, action: &'static str, error: object_store::Error) -> Failure {
        match error {
            object_store::Error::NotFound { .. } => Failure::NotFound(error.to_string()),
            object_store::Error::AlreadyExists { .. } => Failure::AlreadyExists(error.to_string()),
            object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. } => {
                Failure::Changed(error.to_string())
            }
            other => Failure::Outage(self.error(action, other)),
        }
    }

    /// Whether to send a request now. After a failure the store is left alone for
    /// `retry_after`; then the first caller probes it (the others still see it paused until
    /// that probe succeeds or fails again).
    fn usable(&self) -> bool {
        let mut down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *down {
            None => true,
            Some(until) if Instant::now() >= until => {
                *down = Instant::now().checked_add(self.retry_after);
                true
            }
            Some(_) => false,
        }
    }

    /// A request went through: the store is up.
    fn succeeded(&self) {
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.warned.store(false, Ordering::Relaxed);
    }

    /// Records an outage: the store is left alone for a while, with one warning per outage.
    fn outage(&self, error: &Error) {
        let pause = Instant::now().checked_add(self.retry_after);
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = pause;
        let first = !self.warned.swap(true, Ordering::Relaxed);
        if first && !self.strict.load(Ordering::Relaxed) {
            crate::log::warn(&format!(
                "{error}; caching in the local folder only, the remote store is tried again every {:?}",
                self.retry_after
            ));
        }
    }

    fn path(&self, relative: String) -> Result<ObjectPath, Error> {
        ObjectPath::parse(format!("{}/{relative}", self.root))
            .map_err(|e| self.error("naming an object in", e))
    }

    fn version_relative(function: &str, version: &str) -> String {
        let short = version.get(..VERSION_DIR_DIGITS).unwrap_or(version);
        format!("{function}/{short}")
    }

    fn entry_path(&self, at: &EntryAddress<'_>) -> Result<ObjectPath, Error> {
        let hex = at.key.to_hex();
        let version = Self::version_relative(at.function, at.version);
        self.path(format!("{version}/{}/{hex}", &hex[..2]))
    }

    fn lease_path(&self, at: &EntryAddress<'_>) -> Result<ObjectPath, Error> {
        let hex = at.key.to_hex();
        let version = Self::version_relative(at.function, at.version);
        self.path(format!("{version}/{}/{hex}{LEASE_SUFFIX}", &hex[..2]))
    }

    /// How an object is named in messages and listings: `<url>/<path below the prefix>`.
    fn display(&self, path: &ObjectPath) -> PathBuf {
        let below = path.as_ref();
        let prefix_len = self.root.as_ref().len() - LAYOUT_DIR.len();
        // (A server listing a name outside the prefix asked for is shown whole, not cut.)
        let shown = below.get(prefix_len..).unwrap_or(below);
        PathBuf::from(format!("{}/{shown}", self.url))
    }

    /// The object a displayed name stands for, if it is one of this store's.
    fn object_of(&self, shown: &Path) -> Option<ObjectPath> {
        let shown = shown.to_str()?;
        let below = shown.strip_prefix(&self.url)?.strip_prefix('/')?;
        // Only objects of the cache's layout, never anything else in the bucket.
        let layout = below.strip_prefix(LAYOUT_DIR)?.strip_prefix('/')?;
        if layout.is_empty()
            || layout
                .split('/')
                .any(|part| part.is_empty() || part == "..")
        {
            return None;
        }
        let prefix = &self.root.as_ref()[..self.root.as_ref().len() - LAYOUT_DIR.len()];
        ObjectPath::parse(format!("{prefix}{below}")).ok()
    }

    /// An entry's remote bytes: the entry followed by its MAC when a secret is set.
    fn sealed(&self, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(header.len() + payload.len() + MAC_LEN);
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(payload);
        if let Some(key) = &self.mac_key {
            let mac = blake3::keyed_hash(key, &bytes);
            bytes.extend_from_slice(mac.as_bytes());
        }
        bytes
    }

    /// Checks remote bytes for `key` and returns the length of the entry in them (without the
    /// MAC): header, key and checksum always; the MAC when a secret is set.
    fn check(&self, bytes: &[u8], key: &crate::key::CacheKey) -> Result<usize, String> {
        check_entry(self.mac_key.as_ref(), bytes, key)
    }

    /// The object's bytes and description, or `None` when it does not exist.
    fn get(&self, path: ObjectPath) -> Result<Option<(Vec<u8>, ObjectMeta)>, Failure> {
        let objects = Arc::clone(&self.objects);
        let result = self
            .run(async move {
                let got = objects.get(&path).await?;
                let meta = got.meta.clone();
                Ok::<_, object_store::Error>((got.bytes().await?, meta))
            })
            .map_err(Failure::Outage)?;
        self.found(result.map(|(bytes, meta)| (Vec::from(bytes), meta)))
    }

    /// A read's answer, an absent object as `None`.
    fn found<T>(&self, result: Result<T, object_store::Error>) -> Result<Option<T>, Failure> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(e) => match self.classify("reading from", e) {
                Failure::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Stores `payload` at `path`; returns the version written (for a later `If-Match`).
    fn put(
        &self,
        path: ObjectPath,
        payload: PutPayload,
        mode: PutMode,
    ) -> Result<UpdateVersion, Failure> {
        let objects = Arc::clone(&self.objects);
        let result = self
            .run(async move {
                let options = PutOptions::from(mode);
                objects.put_opts(&path, payload, options).await
            })
            .map_err(Failure::Outage)?;
        result
            .map(|put| UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            })
            .map_err(|e| self.classify("writing to", e))
    }

    fn head(&self, path: ObjectPath) -> Result<Option<ObjectMeta>, Failure> {
        let objects = Arc::clone(&self.objects);
        let result = self
            .run(async move { objects.head(&path).await })
            .map_err(Failure::Outage)?;
        self.found(result)
    }

    /// Reads an entry, checked; `None` when absent or broken (a broken one is warned about).
    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<Vec<u8>>, Error> {
        let path = self.entry_path(at)?;
        let shown = self.display(&path);
        let got = self
            .get(path)
            .map_err(|f| self.failure("reading from", f))?;
        let Some((mut bytes, _)) = got else {
            return Ok(None);
        };
        match self.check(&bytes, at.key) {
            Ok(len) => {
                bytes.truncate(len);
                Ok(Some(bytes))
            }
            Err(reason) => {
                crate::log::warn(&format!(
                    "remote cache entry {} is not used: {reason}; treated as a miss",
                    shown.display()
                ));
                Ok(None)
            }
        }
    }

    /// A failure as an error, with the server's word.
    fn failure(&self, action: &'static str, failure: Failure) -> Error {
        match failure {
            Failure::Outage(error) => error,
            Failure::NotFound(word) | Failure::AlreadyExists(word) | Failure::Changed(word) => {
                self.error(action, word)
            }
        }
    }

    /// Stores an entry unless an equal or newer one is there. One in the way that is broken,
    /// or older (it expired, or its `validate` refused it), is replaced, conditionally on being
    /// the one read: a newer one written meanwhile is kept.
    fn write(
        &self,
        at: &EntryAddress<'_>,
        header: &[u8],
        payload: &[u8],
        _preview: Option<&str>,
    ) -> Result<(), Error> {
        let path = self.entry_path(at)?;
        // Shared by both attempts without copying the bytes again.
        let payload = PutPayload::from(self.sealed(header, payload));
        let failed = |f| self.failure("writing to", f);
        match self.put(path.clone(), payload.clone(), PutMode::Create) {
            Ok(_) => return Ok(()),
            Err(Failure::AlreadyExists(_)) => {}
            Err(failure) => return Err(failed(failure)),
        }
        let present = self
            .get(path.clone())
            .map_err(|f| self.failure("reading from", f))?;
        let mode = match present {
            Some((bytes, meta)) => {
                let created = |b: &[u8]| entry::decode_header(b).ok().map(|h| h.created);
                let newer_or_equal =
                    self.check(&bytes, at.key).is_ok() && created(&bytes) >= created(header);
                if newer_or_equal {
                    return Ok(());
                }
                PutMode::Update(UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                })
            }
            // Removed meanwhile.
            None => PutMode::Create,
        };
        match self.put(path, payload, mode) {
            // Replaced, or another machine wrote it meanwhile: either way an entry is there.
            Ok(_) | Err(Failure::Changed(_) | Failure::AlreadyExists(_)) => Ok(()),
            Err(failure) => Err(failed(failure)),
        }
    }

    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error> {
        let path = self.path(format!(
            "{}/{SOURCE_FILE}",
            Self::version_relative(function, version)
        ))?;
        let payload = PutPayload::from(text.as_bytes().to_vec());
        match self.put(path, payload, PutMode::Create) {
            Ok(_) | Err(Failure::AlreadyExists(_)) => Ok(()),
            Err(failure) => Err(self.failure("writing to", failure)),
        }
    }

    fn lease_body(&self) -> PutPayload {
        let expires = SystemTime::now()
            .checked_add(self.lease)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(u128::from(u64::MAX), |d| d.as_millis());
        PutPayload::from(format!("owner={}\nexpires={expires}\n", self.owner).into_bytes())
    }

    /// Claims `at` across machines: a lease of this process's, or word that the value was
    /// stored under another machine's lease (or that `deadline` passed while another machine
    /// held it).
    fn claim(
        self: &Arc<Self>,
        at: &EntryAddress<'_>,
        deadline: Option<Instant>,
    ) -> Result<Claim, Error> {
        let lease_path = self.lease_path(at)?;
        let entry_path = self.entry_path(at)?;
        let failed = |f| self.failure("taking a lease in", f);
        let mut pause = Duration::from_millis(20);
        // Polls are spaced out up to a second (or a fortieth of a short lease).
        let longest = (self.lease / 40).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut create = true;
        let mut waited = false;
        loop {
            if create {
                match self.put(lease_path.clone(), self.lease_body(), PutMode::Create) {
                    Ok(version) => {
                        let lease = Lease::start(self, lease_path, version);
                        return Ok(Claim::Leased(lease, waited));
                    }
                    Err(Failure::AlreadyExists(_)) => {}
                    Err(failure) => return Err(failed(failure)),
                }
            }
            waited = true;
            create = false;
            match self.get(lease_path.clone()).map_err(failed)? {
                // Released meanwhile: take it (after the pause).
                None => create = true,
                Some((body, lease)) => {
                    // A value stored after the lease was taken or last renewed is the holder's
                    // (both times are the server's).
                    let stored = self
                        .head(entry_path.clone())
                        .map_err(|f| self.failure("reading from", f))?;
                    if stored.is_some_and(|entry| entry.last_modified >= lease.last_modified) {
                        return Ok(Claim::Stored);
                    }
                    // Expired, or this process's own (a create whose answer was lost).
                    let ours = lease_owner(&body) == Some(self.owner.as_str());
                    if ours || lease_expired(&body) {
                        let update = PutMode::Update(UpdateVersion {
                            e_tag: lease.e_tag,
                            version: lease.version,
                        });
                        match self.put(lease_path.clone(), self.lease_body(), update) {
                            Ok(version) => {
                                tracing::debug!(target: "memo", "took over the lease {lease_path}");
                                let lease = Lease::start(self, lease_path, version);
                                return Ok(Claim::Leased(lease, !ours));
                            }
                            // Taken over or released by another machine meanwhile: look again.
                            Err(Failure::Changed(_) | Failure::NotFound(_)) => {}
                            Err(failure) => return Err(failed(failure)),
                        }
                    }
                }
            }
            let after_pause = Instant::now().checked_add(pause);
            if deadline.is_some_and(|d| after_pause.is_none_or(|t| t > d)) {
                return Ok(Claim::TimedOut);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(longest);
        }
    }

    /// Every object below `prefix` (default: the whole cache).
    fn list(&self, prefix: Option<ObjectPath>) -> Result<Vec<ObjectMeta>, Error> {
        let objects = Arc::clone(&self.objects);
        let prefix = prefix.unwrap_or_else(|| self.root.clone());
        self.run(async move { objects.list(Some(&prefix)).try_collect::<Vec<_>>().await })?
            .map_err(|e| self.error("listing", e))
    }

    /// The parts of an object's path below the root.
    fn parts<'a>(&self, meta: &'a ObjectMeta) -> Vec<&'a str> {
        let below = meta.location.as_ref();
        below
            .get(self.root.as_ref().len()..)
            .unwrap_or("")
            .trim_start_matches('/')
            .split('/')
            .collect()
    }

    fn delete_all(&self, prefix: ObjectPath) -> Result<(), Error> {
        let metas = self.list(Some(prefix))?;
        let objects = Arc::clone(&self.objects);
        self.run(async move {
            futures::stream::iter(metas)
                .map(|meta| {
                    let objects = Arc::clone(&objects);
                    async move {
                        match objects.delete(&meta.location).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffer_unordered(CONCURRENT)
                .try_collect::<Vec<()>>()
                .await
        })?
        .map(drop)
        .map_err(|e| self.error("removing from", e))
    }

    /// The first `len` bytes of many objects, concurrently (in the order given); `None` for an
    /// object that could not be read.
    fn heads_of(&self, paths: Vec<ObjectPath>, len: u64) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let objects = Arc::clone(&self.objects);
        self.run(async move {
            futures::stream::iter(paths)
                .map(|path| {
                    let objects = Arc::clone(&objects);
                    async move { objects.get_range(&path, 0..len).await.ok().map(Vec::from) }
                })
                .buffered(CONCURRENT)
                .collect::<Vec<_>>()
                .await
        })
    }

    fn entries(&self, function: &str, version: &str) -> Result<Vec<EntryInfo>, Error> {
        let prefix = self.path(Self::version_relative(
            plain_name(function)?,
            plain_name(version)?,
        ))?;
        self.entry_infos(self.list(Some(prefix))?)
    }

    /// The entries among listed objects (leases and source texts left out), with what their
    /// headers say (read 16 at a time), most recently used first.
    fn entry_infos(&self, metas: Vec<ObjectMeta>) -> Result<Vec<EntryInfo>, Error> {
        let metas: Vec<ObjectMeta> = metas
            .into_iter()
            .filter(|m| {
                let parts = self.parts(m);
                parts.len() == 4 && decode_hex_key(parts[3]).is_some()
            })
            .collect();
        let headers = self.heads_of(
            metas.iter().map(|m| m.location.clone()).collect(),
            HEADER_LEN as u64,
        )?;
        let mut entries: Vec<EntryInfo> = metas
            .iter()
            .zip(headers)
            .map(|(meta, header)| {
                let decoded = header.and_then(|h| entry::decode_header(&h).ok());
                EntryInfo {
                    key: self.parts(meta)[3].to_owned(),
                    path: self.display(&meta.location),
                    packed: false,
                    created: decoded.map_or(UNIX_EPOCH, |h| h.created),
                    last_used: system_time(meta),
                    duration: decoded.map_or(Duration::ZERO, |h| h.duration),
                    size: meta.size,
                    readable: decoded.is_some(),
                    preview: None,
                }
            })
            .collect();
        entries.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
        Ok(entries)
    }

    fn source(&self, function: &str, version: &str) -> Result<String, Error> {
        let path = self.path(format!(
            "{}/{SOURCE_FILE}",
            Self::version_relative(plain_name(function)?, plain_name(version)?)
        ))?;
        let shown = self.display(&path);
        match self.get(path) {
            Ok(Some((bytes, _))) => {
                String::from_utf8(bytes).map_err(|e| self.error("reading a source text from", e))
            }
            Ok(None) => Err(self.error(
                "reading from",
                format!("{} does not exist", shown.display()),
            )),
            Err(failure) => Err(self.failure("reading from", failure)),
        }
    }

    /// Checks every entry on the server, 16 at a time, keeping only the verdicts. An entry that
    /// cannot be read (the network, the server) fails the verification rather than being
    /// reported broken, so that `--fix` never removes an entry for a passing failure; so does a
    /// secret that no entry carries (most likely not the cache's).
    fn verify(&self) -> Result<VerifyReport, Error> {
        let mut report = VerifyReport::default();
        let mut checked = Vec::new();
        for meta in self.list(None)? {
            let parts = self.parts(&meta);
            let Some(name) = parts.last() else { continue };
            if name.ends_with(LEASE_SUFFIX) {
                report.lock_files += 1;
            } else if parts.len() == 4 {
                checked.push(meta.location.clone());
            }
        }
        let objects = Arc::clone(&self.objects);
        let mac_key = self.mac_key;
        let verdicts = self.run(async move {
            futures::stream::iter(checked)
                .map(|path| {
                    let objects = Arc::clone(&objects);
                    async move {
                        let name = path.as_ref().rsplit('/').next().unwrap_or_default();
                        let Some(key) = decode_hex_key(name) else {
                            return Ok(Some((path, Err("not an entry name".to_owned()))));
                        };
                        let bytes = match objects.get(&path).await {
                            Ok(got) => got.bytes().await,
                            Err(e) => Err(e),
                        };
                        match bytes {
                            Ok(bytes) => {
                                let verdict = check_entry(mac_key.as_ref(), &bytes, &key);
                                Ok(Some((path, verdict.map(drop))))
                            }
                            // Removed meanwhile.
                            Err(object_store::Error::NotFound { .. }) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffer_unordered(CONCURRENT)
                .try_filter_map(|verdict| async move { Ok(verdict) })
                .try_collect::<Vec<_>>()
                .await
        })?;
        let verdicts = verdicts.map_err(|e| self.error("verifying", e))?;
        let mut wrong_mac = 0;
        for (path, verdict) in verdicts {
            match verdict {
                Ok(()) => report.valid += 1,
                Err(reason) => {
                    wrong_mac += usize::from(reason.contains("MAC"));
                    report.broken.push((self.display(&path), reason));
                }
            }
        }
        if self.mac_key.is_some() && report.valid == 0 && wrong_mac > 0 {
            return Err(self.error(
                "verifying",
                format!(
                    "no entry carries a MAC of this secret ({wrong_mac} carry another or none): \
                     is {MEMO_SECRET} the one this cache is written with?"
                ),
            ));
        }
        report.broken.sort();
        Ok(report)
    }

    /// One listing of the whole cache, grouped by version (not one more per version).
    fn listing(&self) -> Result<Vec<Listed>, Error> {
        let mut versions: Vec<((String, String), Vec<ObjectMeta>)> = Vec::new();
        for meta in self.list(None)? {
            let parts = self.parts(&meta);
            if parts.len() < 3 {
                continue;
            }
            let pair = (parts[0].to_owned(), parts[1].to_owned());
            match versions.iter_mut().find(|(known, _)| *known == pair) {
                Some((_, metas)) => metas.push(meta),
                None => versions.push((pair, vec![meta])),
            }
        }
        let mut listed: Vec<ListedVersion> = Vec::new();
        for ((function, version), metas) in versions {
            let entries = self.entry_infos(metas)?;
            let source = self.source(&function, &version).ok();
            listed.push((function, version, source, entries));
        }
        Ok(assemble_listing(listed))
    }
}

/// Checks remote bytes for `key` and returns the length of the entry in them (without the
/// MAC): header, key and checksum always; the MAC when `mac_key` is given.
fn check_entry(
    mac_key: Option<&[u8; 32]>,
    bytes: &[u8],
    key: &crate::key::CacheKey,
) -> Result<usize, String> {
    let header = entry::decode_header(bytes).map_err(|e| e.to_string())?;
    let entry_len = usize::try_from(header.payload_len)
        .ok()
        .and_then(|n| n.checked_add(HEADER_LEN))
        .ok_or("the header claims an impossible length")?;
    let has_mac = match bytes.len().checked_sub(entry_len) {
        Some(0) => false,
        Some(MAC_LEN) => true,
        _ => {
            return Err(format!(
                "{} bytes, where the header claims {entry_len} (plus {MAC_LEN} with a MAC)",
                bytes.len()
            ))
        }
    };
    if let Some(mac_key) = mac_key {
        if !has_mac {
            return Err(
                "no MAC, and this cache requires entries authenticated by its secret".into(),
            );
        }
        let expected = blake3::keyed_hash(mac_key, &bytes[..entry_len]);
        let mut found = [0u8; MAC_LEN];
        found.copy_from_slice(&bytes[entry_len..]);
        // `blake3::Hash` compares in constant time.
        if expected != blake3::Hash::from_bytes(found) {
            return Err("its MAC is wrong: not written with this cache's secret".into());
        }
    }
    entry::decode(&bytes[..entry_len], key).map_err(|e| e.to_string())?;
    Ok(entry_len)
}

/// The owner a lease names.
fn lease_owner(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(body)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("owner="))
}

fn system_time(meta: &ObjectMeta) -> SystemTime {
    let millis = meta.last_modified.timestamp_millis();
    u64::try_from(millis).map_or(UNIX_EPOCH, |ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Whether a lease's expiry has passed (a lease that cannot be read counts as expired, so a
/// damaged one never blocks its key).
fn lease_expired(body: &[u8]) -> bool {
    let expires = std::str::from_utf8(body).ok().and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("expires="))
            .and_then(|ms| ms.trim().parse::<u64>().ok())
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    expires.is_none_or(|ms| u128::from(ms) <= now)
}

enum Claim {
    /// This process holds the key's lease (and whether another machine held it first).
    Leased(Lease, bool),
    /// The value is stored.
    Stored,
    /// The deadline passed while another machine held the lease.
    TimedOut,
}

/// A lease on a key in the remote store, renewed in the background while held and removed when
/// dropped.
pub(crate) struct Lease {
    remote: Arc<RemoteStore>,
    path: ObjectPath,
    /// Set when a renewal was refused: the lease may be another machine's now.
    lost: Arc<AtomicBool>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn start(remote: &Arc<RemoteStore>, path: ObjectPath, version: UpdateVersion) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let renewal = remote.runtime.as_ref().map(|runtime| {
            let renew = renew(
                Arc::downgrade(remote),
                path.clone(),
                version,
                Arc::clone(&lost),
            );
            runtime.spawn(renew)
        });
        Lease {
            remote: Arc::clone(remote),
            path,
            lost,
            renewal,
        }
    }
}

/// Renews a lease every third of its length, until it is dropped (which aborts this) or a
/// renewal is refused. A renewal that fails for another reason (the network, a busy server) is
/// tried again sooner.
async fn renew(
    store: std::sync::Weak<RemoteStore>,
    path: ObjectPath,
    mut version: UpdateVersion,
    lost: Arc<AtomicBool>,
) {
    let Some(every) = store.upgrade().map(|s| s.lease / 3) else {
        return;
    };
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        let mode = PutMode::Update(version.clone());
        let result = store
            .objects
            .put_opts(&path, store.lease_body(), PutOptions::from(mode))
            .await;
        match result {
            Ok(put) => {
                version = UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                };
                wait = every;
            }
            Err(
                error @ (object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. }),
            ) => {
                // Taken over (this machine could not renew it for a whole lease): the
                // computation goes on; its result is still written with a conditional create.
                tracing::debug!(target: "memo", "the lease {path} was taken over: {error}");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::debug!(target: "memo", "renewing the lease {path}: {error}");
                wait = every / 4;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        // Removed unless it may be another machine's now, or the store is paused after a
        // failure (a lease left behind expires; waiters that see the value stored after it do
        // not wait for that). On a thread of an async runtime the removal is sent without
        // waiting, so that an executor is never blocked; elsewhere it is waited for, so that a
        // process that exits right after does not leave it behind.
        if self.lost.load(Ordering::Relaxed) || !self.remote.usable() {
            return;
        }
        let (objects, path) = (Arc::clone(&self.remote.objects), self.path.clone());
        let remove = async move { objects.delete(&path).await };
        if tokio::runtime::Handle::try_current().is_ok() {
            if let Some(runtime) = &self.remote.runtime {
                drop(runtime.spawn(remove));
            }
        } else {
            let _ = self.remote.run(remove);
        }
    }
}

/// The local folder in front of a remote store: what [`Memory`](crate::Memory) uses for a
/// remote cache. Values are read locally first and written to both; management (listing,
/// verification, eviction by the inspector) works on the remote store, the shared one, and
/// clearing works on both.
#[derive(Debug)]
pub(crate) struct Tiered {
    pub(crate) local: Arc<DirStore>,
    pub(crate) local_dir: PathBuf,
    pub(crate) local_limit: Option<u64>,
    /// Bytes copied from the remote store into the local folder since the last size check.
    fetched_since_check: AtomicU64,
    remote: Arc<RemoteStore>,
}

impl Tiered {
    /// Runs a remote operation unless the store is paused after a failure; a failure pauses it
    /// and, unless strict, is tolerated (`None`).
    fn remote<T>(
        &self,
        operation: impl FnOnce(&Arc<RemoteStore>) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        let strict = self.remote.strict.load(Ordering::Relaxed);
        if !self.remote.usable() && !strict {
            return Ok(None);
        }
        match operation(&self.remote) {
            Ok(value) => {
                self.remote.succeeded();
                Ok(Some(value))
            }
            Err(error) => {
                self.remote.outage(&error);
                if strict {
                    Err(error)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Counts bytes copied into the local folder; past the check interval of its size limit,
    /// enforces the limit in the background (as stores do, see `Memory::bytes_limit`).
    fn note_fetched(&self, bytes: u64) {
        let Some(limit) = self.local_limit else {
            return;
        };
        let since = self.fetched_since_check.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if since < crate::gc::check_interval(limit) {
            return;
        }
        self.fetched_since_check.store(0, Ordering::Relaxed);
        let local: Arc<dyn Store> = Arc::clone(&self.local) as Arc<dyn Store>;
        crate::gc::enforce_in_background(local, self.local_dir.clone(), limit);
    }
}

impl Store for Tiered {
    fn describe(&self, at: &EntryAddress<'_>) -> PathBuf {
        self.local.describe(at)
    }

    fn version_location(&self, function: &str, version: &str) -> PathBuf {
        self.local.version_location(function, version)
    }

    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<EntryBytes>, Error> {
        if let Some(bytes) = self.local.read(at)? {
            return Ok(Some(bytes));
        }
        let Some(Some(bytes)) = self.remote(|remote| remote.read(at))? else {
            return Ok(None);
        };
        // Checked, without its MAC: kept locally, so that the next hit is a local read.
        let (header, payload) = bytes.split_at(HEADER_LEN);
        match self.local.write(at, header, payload, None) {
            Ok(()) => self.note_fetched(bytes.len() as u64),
            Err(error) => {
                tracing::debug!(target: "memo", "keeping a remote entry locally: {error}")
            }
        }
        Ok(Some(EntryBytes::Heap(bytes)))
    }

    fn contains(&self, at: &EntryAddress<'_>) -> bool {
        // Else fetched (and kept locally, where the call then reads it).
        self.local.contains(at) || matches!(self.read(at), Ok(Some(_)))
    }

    fn write(
        &self,
        at: &EntryAddress<'_>,
        header: &[u8],
        payload: &[u8],
        preview: Option<&str>,
    ) -> Result<(), Error> {
        let local = self.local.write(at, header, payload, preview);
        self.remote(|remote| remote.write(at, header, payload, None))?;
        local
    }

    fn touch(&self, at: &EntryAddress<'_>) {
        self.local.touch(at);
    }

    fn flush(&self) -> Result<(), Error> {
        self.local.flush()
    }

    fn compact(&self) {
        self.local.compact();
    }

    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error> {
        let local = self.local.save_source(function, version, text);
        self.remote(|remote| remote.save_source(function, version, text))?;
        local
    }

    fn lock(&self, at: &EntryAddress<'_>, timeout: Option<Duration>) -> Result<Acquired, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let Acquired::Lock { lock, waited } = self.local.lock(at, timeout)? else {
            return Ok(Acquired::TimedOut);
        };
        let local = Box::new(lock);
        match self.remote(|remote| remote.claim(at, deadline))? {
            Some(Claim::Leased(lease, held_elsewhere)) => Ok(Acquired::Lock {
                lock: KeyLock::Remote {
                    local,
                    lease: Some(lease),
                },
                waited: waited || held_elsewhere,
            }),
            Some(Claim::Stored) => Ok(Acquired::Lock {
                lock: KeyLock::Remote { local, lease: None },
                waited: true,
            }),
            Some(Claim::TimedOut) => Ok(Acquired::TimedOut),
            // The remote store is unreachable: this machine computes on its own.
            None => Ok(Acquired::Lock {
                lock: KeyLock::Remote { local, lease: None },
                waited,
            }),
        }
    }

    /// The local folder's clean-up only: a lease left on the server by a machine that died is
    /// taken over when its key is next needed, and listing the server on every first store
    /// would cost every process of a job array a full listing.
    fn clean_version(
        &self,
        function: &str,
        version: &str,
        older_than: Duration,
    ) -> Result<Cleanup, Error> {
        self.local.clean_version(function, version, older_than)
    }

    fn verify(&self) -> Result<VerifyReport, Error> {
        self.remote.verify()
    }

    /// The local folder's versions (what [`Store::clean_version`] cleans).
    fn versions(&self) -> Vec<(String, String)> {
        self.local.versions()
    }

    fn listing(&self) -> Result<Vec<Listed>, Error> {
        self.remote.listing()
    }

    fn source(&self, function: &str, version: &str) -> Result<String, Error> {
        self.remote.source(function, version)
    }

    fn entries(&self, function: &str, version: &str) -> Result<Vec<EntryInfo>, Error> {
        self.remote.entries(function, version)
    }

    fn clear_function(&self, function: &str) -> Result<(), Error> {
        self.local.clear_function(function)?;
        let prefix = self.remote.path(plain_name(function)?.to_owned())?;
        self.remote.delete_all(prefix)
    }

    fn remove_version(&self, function: &str, version: &str) -> Result<(), Error> {
        self.local.remove_version(function, version)?;
        let prefix = self.remote.path(RemoteStore::version_relative(
            plain_name(function)?,
            plain_name(version)?,
        ))?;
        self.remote.delete_all(prefix)
    }

    fn clear(&self) -> Result<(), Error> {
        self.local.clear()?;
        self.remote.delete_all(self.remote.root.clone())
    }

    fn still_broken(&self, path: &Path) -> bool {
        // A remote object is checked again when read; a local one here.
        self.remote.object_of(path).is_some() || self.local.still_broken(path)
    }

    fn remove_entry(&self, path: &Path) -> Result<bool, Error> {
        let Some(object) = self.remote.object_of(path) else {
            return self.local.remove_entry(path);
        };
        let objects = Arc::clone(&self.remote.objects);
        match self
            .remote
            .run(async move { objects.delete(&object).await })?
        {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.remote.error("removing from", e)),
        }
    }

    fn remote_url(&self) -> Option<&str> {
        Some(&self.remote.url)
    }

    fn set_strict(&self, strict: bool) {
        self.remote.strict.store(strict, Ordering::Relaxed);
        self.local.set_strict(strict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::CacheKey;

    /// A store that is never reached: building one makes no request.
    fn store(secret: Option<&str>) -> RemoteStore {
        let mut config = RemoteConfig::new("s3://bucket/prefix/")
            .option("aws_region", "us-east-1")
            .option("aws_access_key_id", "id")
            .option("aws_secret_access_key", "key")
            .option("aws_endpoint", "http://127.0.0.1:9");
        if let Some(secret) = secret {
            config = config.secret(secret);
        }
        RemoteStore::open(config).unwrap()
    }

    #[test]
    fn entries_are_checked_and_authenticated_by_the_secret() {
        let key = CacheKey::from_bytes([7; 32]);
        let payload = b"value";
        let header = entry::encode_header(&key, SystemTime::now(), Duration::ZERO, payload);
        let (plain, signed, other) = (store(None), store(Some("secret")), store(Some("other")));
        let entry_len = HEADER_LEN + payload.len();

        let sealed = signed.sealed(&header, payload);
        assert_eq!(sealed.len(), entry_len + MAC_LEN);
        assert_eq!(signed.check(&sealed, &key), Ok(entry_len));
        // Without a secret the MAC cannot be checked; the checksum still is.
        assert_eq!(plain.check(&sealed, &key), Ok(entry_len));
        assert!(other
            .check(&sealed, &key)
            .unwrap_err()
            .contains("MAC is wrong"));

        let unsigned = plain.sealed(&header, payload);
        assert_eq!(unsigned.len(), entry_len);
        assert_eq!(plain.check(&unsigned, &key), Ok(entry_len));
        assert!(signed
            .check(&unsigned, &key)
            .unwrap_err()
            .contains("no MAC"));

        let mut tampered = sealed.clone();
        tampered[HEADER_LEN] ^= 1;
        assert!(signed.check(&tampered, &key).unwrap_err().contains("MAC"));
        assert!(
            plain.check(&tampered, &key).is_err(),
            "the checksum catches it"
        );
        let other_key = CacheKey::from_bytes([8; 32]);
        assert!(signed.check(&sealed, &other_key).is_err());
        assert!(plain.check(&sealed[..sealed.len() - 3], &key).is_err());
        assert!(plain.check(&sealed[..10], &key).is_err());
    }

    #[test]
    fn bad_locations_and_settings_are_named() {
        let error = |config: RemoteConfig| RemoteStore::open(config).unwrap_err().to_string();
        assert!(error(RemoteConfig::new("s3:///prefix")).contains("names no bucket"));
        assert!(error(RemoteConfig::new("bucket/prefix")).contains("is not a URL"));
        assert!(error(RemoteConfig::new("ftp://host/dir")).contains("no remote store for `ftp://`"));
        let unknown = RemoteConfig::new("s3://bucket").option("no_such_setting", "1");
        assert!(error(unknown).contains("no_such_setting"));
    }

    #[test]
    fn shown_names_lead_back_to_their_objects() {
        let remote = store(None);
        let key = CacheKey::from_bytes([0xab; 32]);
        let at = EntryAddress {
            function: "my_crate.f",
            version: "0123456789abcdef0123",
            key: &key,
        };
        let path = remote.entry_path(&at).unwrap();
        let shown = remote.display(&path);
        let hex = key.to_hex();
        assert_eq!(
            shown,
            PathBuf::from(format!(
                "s3://bucket/prefix/v1/my_crate.f/0123456789abcdef/ab/{hex}"
            ))
        );
        assert_eq!(remote.object_of(&shown), Some(path));
        assert_eq!(remote.object_of(Path::new("/tmp/v1/my_crate.f")), None);
        assert!(remote.lease_path(&at).unwrap().as_ref().ends_with(".lease"));
    }

    #[test]
    fn leases_expire_by_their_own_time_and_unreadable_ones_count_as_expired() {
        let later = SystemTime::now() + Duration::from_secs(60);
        let ms = later.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(!lease_expired(
            format!("owner=a\nexpires={ms}\n").as_bytes()
        ));
        assert!(lease_expired(b"owner=a\nexpires=1000\n"));
        assert!(lease_expired(b"garbage"));
    }
}
