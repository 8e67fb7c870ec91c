//! Checkpoints and outputs on object storage: `s3://bucket/prefix`, and through the same URL
//! parsing `gs://`, `az://` (`azure://`, `abfs[s]://`) and, for reading, `http(s)://`.
//!
//! A remote location travels through pma as a `Path` holding its URL (`s3://b/run/step-100`),
//! so run discovery, selection, plans and error messages treat it like a directory; only the
//! functions that touch bytes look at [`is_url`] and come here. The layer has three parts:
//! - [`object`]: one object read by ranged GETs. A safetensors header is read in two GETs
//!   (the 8-byte length, then the JSON) and validated by [`crate::Header::read_from`], the
//!   same staged validation as a local file. Tensor bytes are fetched per pipeline job, with a
//!   bounded number of bytes prefetched ahead ([`PREFETCH_BUDGET_BYTES`]), so memory stays flat
//!   whatever the model size and nothing is downloaded whole;
//! - [`listing`]: the directory view (children of a prefix, one object's existence, small
//!   objects read whole) that run discovery and checkpoint detection need;
//! - [`upload`]: writing outputs with multipart uploads, the index last as the commit (see the
//!   README on what "atomic" means on an object store): a merge streams its shards straight
//!   into uploads ([`ObjectWriter`], through [`crate::StreamWriter`]), parts leaving while it
//!   computes; other outputs are staged locally and published whole ([`publish`]).
//!
//! `object_store` is async. The layer owns one small multi-thread tokio runtime and exposes a
//! blocking API, since the merge pipeline is rayon threads that block on their reads. Stores
//! are built once per bucket (connection pools are reused) from the standard environment
//! chains: `AmazonS3Builder::from_env` reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` (plus web
//! identity and instance metadata), and likewise `GOOGLE_*` and `AZURE_*`. Requests time out
//! and retry a bounded number of times ([`retry_config`]), so an unreachable endpoint is an
//! error within seconds, never a hang. Errors carry the URL and the HTTP status, and the
//! store's message with every credential from the environment redacted.

pub mod listing;
pub mod object;
pub mod upload;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub(crate) use object_store::ObjectStoreExt;
use object_store::{ObjectStore, ObjectStoreScheme};

use crate::error::{Error, Result};

pub use listing::{
    head, is_dir, list_dir, list_recursive, probe_file, read_bounded, DirEntry, EntryKind,
    ObjectInfo,
};
pub use object::{
    download, get_counters, RemoteObject, DOWNLOAD_RANGE_BYTES, PREFETCH_BUDGET_BYTES,
};
pub use upload::{
    check_output_absent, copy_object, max_copy_bytes, publish, remove_prefix, ObjectWriter,
    Publication, PublishReport, DEFAULT_PART_BYTES, PART_BYTES_ENV,
};

/// URL schemes read as object-store locations.
const SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
];

/// Longest store message kept in an error: enough for the server's error code and message.
const MAX_REASON_CHARS: usize = 400;

/// Whether `path` is an object-store URL (`s3://...`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme))
}

/// An object or prefix on a store: the store client, the key, and the URL for messages.
#[derive(Clone)]
pub(crate) struct Location {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) key: object_store::path::Path,
    pub(crate) url: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Location {
    /// Parses an object-store URL and finds (or builds) the client for its bucket.
    pub(crate) fn parse(path: &Path) -> Result<Location> {
        let text = path.to_string_lossy();
        let text = text.trim_end_matches('/');
        let unsupported = |reason: String| Error::RemoteUnsupported {
            url: text.to_string(),
            reason,
        };
        let url = url::Url::parse(text).map_err(|e| unsupported(format!("not a URL: {e}")))?;
        let (scheme, key) = ObjectStoreScheme::parse(&url)
            .map_err(|e| unsupported(format!("not an object store URL: {e}")))?;
        let store = store_for(&url, scheme).map_err(|e| unsupported(redact(&e.to_string())))?;
        Ok(Location {
            store,
            key,
            url: text.to_string(),
        })
    }

    /// The object or prefix `name` below this one (`a/b` is two levels, not one key part).
    pub(crate) fn child(&self, name: &str) -> Location {
        let key = name
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.key.clone(), |key, part| key.join(part));
        Location {
            store: self.store.clone(),
            key,
            url: format!("{}/{name}", self.url),
        }
    }
}

/// Retries and timeouts: a few quick retries of transient failures, and a hard bound on the
/// total, so that a wrong or unreachable endpoint fails in seconds (about 15 s at most).
pub fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
    }
}

/// Connect within this, or count the attempt failed.
const CONNECT_TIMEOUT: &str = "3s";
/// One request (a ranged GET of a pipeline job, one multipart part) finishes within this.
const REQUEST_TIMEOUT: &str = "120s";

fn store_for(
    url: &url::Url,
    scheme: ObjectStoreScheme,
) -> object_store::Result<Arc<dyn ObjectStore>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let bucket = url[..url::Position::BeforePath].to_string();
    let stores = STORES.get_or_init(Default::default);
    if let Some(s) = stores
        .lock()
        .expect("store cache lock is never poisoned")
        .get(&bucket)
    {
        return Ok(s.clone());
    }
    use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey::Client};
            let mut b = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .with_config(Client(ConnectTimeout), CONNECT_TIMEOUT)
                .with_config(Client(Timeout), REQUEST_TIMEOUT);
            // boto3 and the AWS CLI default to us-east-1 when no region is configured.
            if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            Arc::new(b.build()?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey::Client};
            Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config())
                    .with_config(Client(ConnectTimeout), CONNECT_TIMEOUT)
                    .with_config(Client(Timeout), REQUEST_TIMEOUT)
                    .build()?,
            )
        }
        ObjectStoreScheme::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey::Client, MicrosoftAzureBuilder};
            Arc::new(
                MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config())
                    .with_config(Client(ConnectTimeout), CONNECT_TIMEOUT)
                    .with_config(Client(Timeout), REQUEST_TIMEOUT)
                    .build()?,
            )
        }
        ObjectStoreScheme::Http => {
            let options = object_store::ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(120));
            Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(bucket.clone())
                    .with_retry(retry_config())
                    .with_client_options(options)
                    .build()?,
            )
        }
        other => {
            return Err(object_store::Error::NotSupported {
                source: format!("{other:?} is not an object store pma reads").into(),
            })
        }
    };
    stores
        .lock()
        .expect("store cache lock is never poisoned")
        .insert(bucket, store.clone());
    Ok(store)
}

/// The layer's runtime: two workers drive every request (the work is network waits, not CPU).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pma-store")
            .enable_all()
            .build()
            .expect("a tokio runtime starts (it only fails when the OS cannot spawn threads)")
    })
}

/// Runs `fut` to completion from a synchronous caller (a rayon worker or the main thread).
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    runtime().block_on(fut)
}

/// Enters the layer's runtime on this thread (for APIs that spawn, like multipart writers).
pub(crate) fn enter() -> tokio::runtime::EnterGuard<'static> {
    runtime().enter()
}

/// Starts `fut` on the layer's runtime and returns at once.
pub(crate) fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(fut)
}

/// An object-store failure as this crate's error: the URL, the action, the HTTP status when
/// there is one, and the store's message with credentials redacted.
pub(crate) fn store_error(url: &str, action: &'static str, e: &object_store::Error) -> Error {
    use object_store::Error as E;
    let detail = error_chain(e);
    let (status, lead) = match e {
        E::NotFound { .. } => (Some(404), "no such object"),
        E::PermissionDenied { .. } => (
            Some(403),
            "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket policy",
        ),
        E::Unauthenticated { .. } => (Some(401), "the credentials were rejected"),
        E::Precondition { .. } => (Some(412), "precondition failed"),
        E::AlreadyExists { .. } => (Some(409), "already exists"),
        _ => (status_in(&detail), ""),
    };
    let detail = redact(&detail);
    let reason = match lead {
        "" => detail,
        lead => format!("{lead} ({detail})"),
    };
    Error::Remote {
        url: url.to_string(),
        action,
        status,
        reason: reason.chars().take(MAX_REASON_CHARS).collect(),
    }
}

/// The error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The HTTP status in a store message ("... status code: 500 ..."), if there is one.
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// `text` with the value of every credential variable in the environment replaced by `***`,
/// so that no secret (or key id echoed back by a server) reaches a log or an error.
pub(crate) fn redact(text: &str) -> String {
    const SECRET_VARS: &[&str] = &[
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_TOKEN",
        "AZURE_CLIENT_SECRET",
    ];
    let mut out = text.to_string();
    for var in SECRET_VARS {
        if let Ok(value) = std::env::var(var) {
            if value.len() >= 4 {
                out = out.replace(&value, "***");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url(Path::new("s3://bucket/run")));
        assert!(is_url(Path::new("gs://bucket/run/step-1")));
        assert!(is_url(Path::new("https://host/x.safetensors")));
        assert!(!is_url(Path::new("/data/run")));
        assert!(!is_url(Path::new("run/s3://x")));
        assert!(!is_url(Path::new("ftp://host/x")));
    }

    #[test]
    fn status_is_found_in_store_messages() {
        assert_eq!(
            status_in("Server returned non-2xx status code: 503 Service Unavailable: slow down"),
            Some(503)
        );
        assert_eq!(status_in("error sending request"), None);
    }

    #[test]
    fn unknown_schemes_are_one_clear_error() {
        let e = Location::parse(Path::new("s3:/no-bucket")).unwrap_err();
        assert!(matches!(e, Error::RemoteUnsupported { .. }), "{e}");
    }
}
