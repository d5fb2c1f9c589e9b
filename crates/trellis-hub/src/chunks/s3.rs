//! Chunks in any S3-compatible object store (`--chunks
//! s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&style=path|virtual`).
//!
//! Each chunk is one object, `<prefix>chunks/<digest>`, holding its stored
//! form. Credentials come from the environment, as S3 clients expect
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally
//! `AWS_SESSION_TOKEN`); the region from the URL, else `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, else `us-east-1`. Without `endpoint` the store is
//! AWS S3 itself (virtual-host addressing); with one, path-style addressing
//! (what MinIO, SeaweedFS, Garage and Ceph expect) unless `style=virtual`.
//!
//! Requests are signed with AWS Signature V4 by `rusty-s3` and sent with
//! `reqwest`. "Wanted" (see [`crate::gc`]) is the object's `Last-Modified`,
//! moved by copying the object onto itself.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::StatusCode;
pub use rusty_s3::Credentials;
use rusty_s3::{Bucket, S3Action, UrlStyle};
use trellis_cas::{Digest, StoredChunk};
use url::Url;

use super::{ChunkBackend, ChunkError};

/// How long a signed request stays valid: long enough for a slow upload to
/// start, short enough to be useless if it leaks into a log.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// Where the chunks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
    pub endpoint: Url,
    pub region: String,
    pub path_style: bool,
}

fn bad_url(url: &str, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "--chunks {url:?} {why}; give s3://BUCKET?endpoint=URL (for example \
         s3://trellis-artifacts?endpoint=http://minio.example:9000), or leave it out for the \
         directory artifacts/ in the data directory"
    )
}

impl S3Location {
    /// Reads `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&style=path|virtual`.
    pub fn parse(url: &str) -> anyhow::Result<S3Location> {
        let parsed = Url::parse(url).map_err(|e| bad_url(url, &format!("is not a URL ({e})")))?;
        if parsed.scheme() != "s3" {
            return Err(bad_url(url, "is not an s3:// URL"));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad_url(url, "names no bucket"))?
            .to_owned();
        let mut prefix = parsed.path().trim_matches('/').to_owned();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        let mut endpoint = None;
        let mut region = None;
        let mut style = None;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "endpoint" => endpoint = Some(value.into_owned()),
                "region" => region = Some(value.into_owned()),
                "style" => style = Some(value.into_owned()),
                other => {
                    return Err(bad_url(
                        url,
                        &format!("has parameter {other:?}; it takes endpoint, region and style"),
                    ));
                }
            }
        }
        let region = region
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let path_style = match style.as_deref() {
            None => endpoint.is_some(),
            Some("path") => true,
            Some("virtual") => false,
            Some(other) => {
                return Err(bad_url(
                    url,
                    &format!("has style={other}; it is path or virtual"),
                ));
            }
        };
        let endpoint = match endpoint {
            Some(e) => Url::parse(&e).map_err(|err| {
                bad_url(
                    url,
                    &format!("has endpoint {e:?}, which is not a URL ({err})"),
                )
            })?,
            None => Url::parse(&format!("https://s3.{region}.amazonaws.com"))
                .map_err(|e| bad_url(url, &format!("has region {region:?} ({e})")))?,
        };
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(bad_url(
                url,
                "has an endpoint that is not http:// or https://",
            ));
        }
        Ok(S3Location {
            bucket,
            prefix,
            endpoint,
            region,
            path_style,
        })
    }
}

/// The S3 backend.
pub struct S3Chunks {
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    http: reqwest::Client,
    describe: String,
}

impl S3Chunks {
    /// The backend for `location`, with `credentials`, or those of the
    /// environment.
    pub fn new(location: S3Location, credentials: Option<Credentials>) -> anyhow::Result<S3Chunks> {
        let describe = format!(
            "the S3 bucket {:?} at {}",
            location.bucket,
            location.endpoint.as_str().trim_end_matches('/')
        );
        let credentials = credentials.or_else(Credentials::from_env).ok_or_else(|| {
            anyhow::anyhow!(
                "{describe} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (and AWS_SESSION_TOKEN for temporary ones) in the hub's environment"
            )
        })?;
        let style = if location.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            location.endpoint.clone(),
            style,
            location.bucket.clone(),
            location.region.clone(),
        )
        .map_err(|e| anyhow::anyhow!("{describe} cannot be addressed: {e}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| anyhow::anyhow!("setting up the S3 client failed: {e}"))?;
        Ok(S3Chunks {
            bucket,
            credentials,
            prefix: location.prefix,
            http,
            describe,
        })
    }

    fn key(&self, digest: &Digest) -> String {
        format!("{}chunks/{}", self.prefix, digest.as_hex())
    }

    fn unavailable(&self, e: &reqwest::Error) -> ChunkError {
        ChunkError::Unavailable {
            store: self.describe.clone(),
            reason: without_url(e),
        }
    }

    /// An answer that is not what was asked for.
    async fn refusal(&self, doing: &str, response: reqwest::Response) -> ChunkError {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let code = xml_field(&body, "Code");
        let message = xml_field(&body, "Message");
        let detail = match (code, message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            _ => status.to_string(),
        };
        let reason = format!("{doing} answered HTTP {}: {detail}", status.as_u16());
        match status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => ChunkError::Refused {
                store: self.describe.clone(),
                reason: format!(
                    "{reason}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and what they may do in the bucket"
                ),
            },
            s if s.is_server_error() => ChunkError::Unavailable {
                store: self.describe.clone(),
                reason,
            },
            _ => ChunkError::Failed {
                store: self.describe.clone(),
                reason,
                disk_full: false,
            },
        }
    }
}

/// A reqwest error without the signed URL it would print.
fn without_url(e: &reqwest::Error) -> String {
    let e = e.to_string();
    match e.split_once(" for url (") {
        Some((head, _)) => head.to_owned(),
        None => e,
    }
}

/// The text of `<name>…</name>` in an S3 error document.
fn xml_field(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(body[start..end].to_owned())
}

#[async_trait]
impl ChunkBackend for S3Chunks {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn check(&self) -> Result<(), ChunkError> {
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(SIGNED_FOR);
        let response = self
            .http
            .head(url)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(ChunkError::Failed {
                store: self.describe.clone(),
                reason: "the bucket does not exist; create it (or fix its name in --chunks)".into(),
                disk_full: false,
            }),
            StatusCode::MOVED_PERMANENTLY => Err(ChunkError::Failed {
                store: self.describe.clone(),
                reason: "the bucket is in another region; give region=… in --chunks".into(),
                disk_full: false,
            }),
            _ => Err(self.refusal("looking at the bucket", response).await),
        }
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, ChunkError> {
        let key = self.key(digest);
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &key)
            .sign(SIGNED_FOR);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        match response.status() {
            StatusCode::OK => Ok(Some(
                response.bytes().await.map_err(|e| self.unavailable(&e))?,
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.refusal("reading a chunk", response).await),
        }
    }

    async fn put(&self, digest: &Digest, stored: Bytes) -> Result<(), ChunkError> {
        let key = self.key(digest);
        let url = self
            .bucket
            .put_object(Some(&self.credentials), &key)
            .sign(SIGNED_FOR);
        let response = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, stored.len())
            .body(stored)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.refusal("storing a chunk", response).await)
        }
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, ChunkError> {
        let key = self.key(digest);
        let url = self
            .bucket
            .head_object(Some(&self.credentials), &key)
            .sign(SIGNED_FOR);
        let response = self
            .http
            .head(url)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal("looking up a chunk", response).await),
        }
    }

    async fn touch(&self, digest: &Digest) -> Result<bool, ChunkError> {
        // Copying an object onto itself with new metadata is how S3 moves
        // its Last-Modified.
        let key = self.key(digest);
        let source = format!("/{}/{key}", self.bucket.name());
        let mut copy = self.bucket.put_object(Some(&self.credentials), &key);
        copy.headers_mut()
            .insert("x-amz-copy-source", source.clone());
        copy.headers_mut()
            .insert("x-amz-metadata-directive", "REPLACE");
        let url = copy.sign(SIGNED_FOR);
        let response = self
            .http
            .put(url)
            .header("x-amz-copy-source", source)
            .header("x-amz-metadata-directive", "REPLACE")
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal("marking a chunk as wanted", response).await),
        }
    }

    async fn list(&self) -> Result<Vec<StoredChunk>, ChunkError> {
        let prefix = format!("{}chunks/", self.prefix);
        let mut chunks = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut list = self.bucket.list_objects_v2(Some(&self.credentials));
            list.with_prefix(prefix.as_str());
            if let Some(token) = &token {
                list.with_continuation_token(token.as_str());
            }
            let url = list.sign(SIGNED_FOR);
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| self.unavailable(&e))?;
            if !response.status().is_success() {
                return Err(self.refusal("listing chunks", response).await);
            }
            let text = response.text().await.map_err(|e| self.unavailable(&e))?;
            let parsed = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                ChunkError::Failed {
                    store: self.describe.clone(),
                    reason: format!("its list of objects could not be read: {e}"),
                    disk_full: false,
                }
            })?;
            for object in &parsed.contents {
                let Some(digest) = object
                    .key
                    .strip_prefix(&prefix)
                    .and_then(|hex| hex.parse::<Digest>().ok())
                else {
                    continue;
                };
                let modified = object
                    .last_modified
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                chunks.push(StoredChunk {
                    digest,
                    stored: object.size.unwrap_or(0),
                    modified,
                });
            }
            match parsed.next_continuation_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(chunks),
            }
        }
    }

    async fn remove(&self, digest: &Digest) -> Result<bool, ChunkError> {
        let key = self.key(digest);
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), &key)
            .sign(SIGNED_FOR);
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|e| self.unavailable(&e))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refusal("removing a chunk", response).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_s3_urls() {
        let l = S3Location::parse(
            "s3://artifacts/hub-1/?endpoint=http://127.0.0.1:8333&region=eu-west-1",
        )
        .unwrap();
        assert_eq!(l.bucket, "artifacts");
        assert_eq!(l.prefix, "hub-1/");
        assert_eq!(l.endpoint.as_str(), "http://127.0.0.1:8333/");
        assert_eq!(l.region, "eu-west-1");
        assert!(l.path_style);
        let aws = S3Location::parse("s3://artifacts?region=eu-central-1").unwrap();
        assert_eq!(
            aws.endpoint.as_str(),
            "https://s3.eu-central-1.amazonaws.com/"
        );
        assert!(!aws.path_style);
        assert_eq!(aws.prefix, "");
        let virt = S3Location::parse("s3://b?endpoint=https://s3.example&style=virtual").unwrap();
        assert!(!virt.path_style);
        for bad in [
            "http://bucket",
            "s3://",
            "s3://b?endpoint=ftp://x",
            "s3://b?endpoint=not a url",
            "s3://b?style=sideways",
            "s3://b?bucket=x",
            "no url",
        ] {
            let e = S3Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains("s3://BUCKET?endpoint=URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn reads_s3_error_documents() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(
            xml_field(body, "Message").as_deref(),
            Some("The specified bucket does not exist")
        );
        assert_eq!(xml_field(body, "Nope"), None);
    }
}
