//! Merges from and to a real S3 server (moto_server, started by `.ci/run`, which exports
//! `PMA_S3_ENDPOINT` and `PMA_REQUIRE_S3=1`).
//!
//! Each test makes its own bucket (one plain HTTP request: object_store cannot create buckets),
//! uploads fixture checkpoints and reads results back through pma's object-store layer (signed
//! requests: moto refuses anonymous object reads), and runs `pma` with the AWS environment
//! pointing at the server. Without a reachable server the tests print SKIPPED
//! and pass, unless `PMA_REQUIRE_S3=1`, where they fail.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{fixtures, pma};

/// The secret every test passes: it must never appear in pma's output.
const SECRET: &str = "testing-secret-0123456789";

struct S3 {
    /// `http://127.0.0.1:PORT`.
    endpoint: String,
    bucket: String,
}

/// The server from `PMA_S3_ENDPOINT`, with a fresh bucket; `None` (SKIPPED) without one,
/// a failure when `PMA_REQUIRE_S3=1`.
fn s3(test: &str) -> Option<S3> {
    let required = std::env::var("PMA_REQUIRE_S3").is_ok_and(|v| v == "1");
    let endpoint = std::env::var("PMA_S3_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let reachable = endpoint.as_deref().is_some_and(|e| {
        let addr = e.trim_start_matches("http://");
        addr.parse()
            .ok()
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    if !reachable {
        assert!(
            !required,
            "PMA_REQUIRE_S3=1 but no S3 server answers at PMA_S3_ENDPOINT={endpoint:?}"
        );
        eprintln!("SKIPPED {test}: no S3 server (set PMA_S3_ENDPOINT, see .ci/run)");
        return None;
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let bucket = format!(
        "pma-{}-{}-{}",
        test.replace('_', "-"),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let s3 = S3 {
        endpoint: endpoint.expect("reachable implies set"),
        bucket,
    };
    // The layer this process uses to upload and download reads the same environment as pma.
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        for (k, v) in [
            ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
    });
    let (status, _, body) = s3.request("PUT", &format!("/{}", s3.bucket), b"");
    assert_eq!(
        status,
        200,
        "creating bucket: {}",
        String::from_utf8_lossy(&body)
    );
    Some(s3)
}

impl S3 {
    /// One plain HTTP/1.1 request; returns (status, headers lowercased, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        http(&self.endpoint, method, path, body)
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn get(&self, key: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        pma_format::remote::download(Path::new(&self.url(key)), None, &mut bytes)
            .unwrap_or_else(|e| panic!("GET {key}: {e}"));
        bytes
    }

    fn etag(&self, key: &str) -> String {
        pma_format::remote::head(Path::new(&self.url(key)))
            .unwrap_or_else(|e| panic!("HEAD {key}: {e}"))
            .e_tag
            .expect("S3 answers an ETag")
            .trim_matches('"')
            .to_string()
    }

    /// Every key under `prefix/`, sorted.
    fn keys(&self, prefix: &str) -> Vec<String> {
        pma_format::remote::list_recursive(Path::new(&self.url(prefix)), 10_000)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|rel| format!("{prefix}/{rel}"))
            .collect()
    }

    /// Uploads every file under `dir` as `prefix/<relative path>`.
    fn upload_dir(&self, dir: &Path, prefix: &str) {
        pma_format::remote::publish(dir, Path::new(&self.url(prefix)), true)
            .unwrap_or_else(|e| panic!("uploading {}: {e}", dir.display()));
    }

    /// `pma` with the AWS environment pointing at this server.
    fn pma(&self) -> assert_cmd::Command {
        let mut cmd = pma();
        aws_env(&mut cmd, &self.endpoint);
        cmd
    }
}

fn aws_env(cmd: &mut assert_cmd::Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

fn http(
    endpoint: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut payload = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
    {
        payload = dechunk(&payload);
    }
    (status, headers, payload)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

/// A copy of the bf16 fixture run without its expected outputs.
fn bf16_run(root: &Path) -> PathBuf {
    let run = root.join("run");
    for step in [
        "step-0000100",
        "step-0000200",
        "step-0000300",
        "step-0000400",
    ] {
        common::copy_tree(&fixtures().join("run-bf16").join(step), &run.join(step));
    }
    run
}

/// Two checkpoint directories hold the same files, the same tensors bit for bit, and the same
/// sidecar bytes. (The safetensors headers differ only in the provenance metadata, which names
/// the inputs' paths or URLs.)
fn assert_same_checkpoint(a: &Path, b: &Path) {
    let files = common::listing(a);
    assert_eq!(
        files,
        common::listing(b),
        "{} vs {}",
        a.display(),
        b.display()
    );
    assert!(
        files.iter().any(|f| f.ends_with(".safetensors")),
        "{files:?}"
    );
    assert_eq!(common::read_tensors(a), common::read_tensors(b));
    for f in files
        .iter()
        .filter(|f| !f.ends_with('/') && !f.ends_with(".safetensors"))
    {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
}

impl S3 {
    /// Downloads every object under `prefix/` into `dir`.
    fn download(&self, prefix: &str, dir: &Path) {
        for key in self.keys(prefix) {
            let rel = &key[prefix.len() + 1..];
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, self.get(&key)).unwrap();
        }
    }
}

fn assert_no_secret(out: &std::process::Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(SECRET), "the secret leaked: {text}");
}

#[test]
fn s3_run_merge_is_bit_identical_to_the_local_merge() {
    let Some(s3) = s3("run_merge") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    s3.upload_dir(&run, "runs/bf16");
    // Listing-based discovery (--run s3://...), a sharded member (step 300) among them.
    for (args, name) in [
        (vec!["--method", "sma"], "sma"),
        (vec!["--method", "ema", "--last", "3"], "ema"),
    ] {
        let local = tmp.path().join(format!("local-{name}"));
        pma()
            .args(["merge", "--quiet", "--run"])
            .arg(&run)
            .args(&args)
            .arg("--out")
            .arg(&local)
            .assert()
            .success();
        let remote = tmp.path().join(format!("remote-{name}"));
        s3.pma()
            .args(["merge", "--quiet", "--run", &s3.url("runs/bf16")])
            .args(&args)
            .arg("--out")
            .arg(&remote)
            .assert()
            .success();
        assert!(local.join("config.json").is_file());
        assert_same_checkpoint(&local, &remote);
    }
    // Explicit members, single-file output, bit-identical to the committed expectation.
    let out = tmp.path().join("last2.safetensors");
    s3.pma()
        .args(["merge", "--quiet", "--method", "sma"])
        .args([
            s3.url("runs/bf16/step-0000300"),
            s3.url("runs/bf16/step-0000400"),
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert_eq!(
        common::read_tensors(&out),
        common::read_tensors(&fixtures().join("run-bf16/expected/sma-last2.safetensors"))
    );
    // inspect reads the sharded member's headers by ranged GETs.
    let shown = s3
        .pma()
        .args(["inspect", "--json", &s3.url("runs/bf16/step-0000300")])
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let local = pma()
        .args(["inspect", "--json"])
        .arg(run.join("step-0000300"))
        .output()
        .unwrap();
    let tensors = |o: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["inspect"]["tensors"].clone()
    };
    assert_eq!(tensors(&shown), tensors(&local));
    // diff of two remote members equals the local diff.
    let diff = |a: &str, b: &str| {
        let o = s3.pma().args(["diff", "--json", a, b]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["diff"]["tensors"].clone()
    };
    let remote_diff = diff(
        &s3.url("runs/bf16/step-0000100"),
        &s3.url("runs/bf16/step-0000300"),
    );
    let local_diff = diff(
        run.join("step-0000100").to_str().unwrap(),
        run.join("step-0000300").to_str().unwrap(),
    );
    assert_eq!(remote_diff, local_diff);
    assert!(remote_diff.as_array().is_some_and(|a| !a.is_empty()));
}

#[test]
fn outputs_publish_to_s3_with_the_index_last_and_overwrite_kept() {
    let Some(s3) = s3("publish") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    s3.upload_dir(&run, "runs/bf16");
    // Small shards so the output has an index to commit last.
    let shard = ["--max-shard-size", "3000"];
    let local = tmp.path().join("local");
    pma()
        .args(["merge", "--quiet", "--method", "sma", "--run"])
        .arg(&run)
        .args(shard)
        .arg("--out")
        .arg(&local)
        .assert()
        .success();
    let files: Vec<String> = common::listing(&local)
        .into_iter()
        .filter(|f| !f.ends_with('/'))
        .collect();
    assert!(
        files.contains(&"model.safetensors.index.json".to_string()),
        "{files:?}"
    );
    // local -> S3 and S3 -> S3.
    for (from, key) in [
        (run.to_str().unwrap().to_string(), "out/local-to-s3"),
        (s3.url("runs/bf16"), "out/s3-to-s3"),
    ] {
        let o = s3
            .pma()
            .args(["merge", "--method", "sma", "--run", &from])
            .args(shard)
            .args(["--out", &s3.url(key)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_no_secret(&o);
        let want: Vec<String> = files.iter().map(|f| format!("{key}/{f}")).collect();
        assert_eq!(s3.keys(key), want);
        let got = tmp.path().join(key);
        s3.download(key, &got);
        assert_same_checkpoint(&local, &got);
        if !from.starts_with("s3://") {
            // Same inputs, so the same provenance in the headers: the shards streamed into
            // multipart uploads are byte for byte the files of the local merge.
            for f in &files {
                assert_eq!(
                    std::fs::read(local.join(f)).unwrap(),
                    std::fs::read(got.join(f)).unwrap(),
                    "{f}"
                );
            }
        }
    }
    // An existing output is refused without --overwrite, before anything is read or written.
    let refused = s3
        .pma()
        .args([
            "merge",
            "--quiet",
            "--run",
            &s3.url("runs/bf16"),
            "--method",
            "wma",
        ])
        .args(["--out", &s3.url("out/s3-to-s3")])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        s3.get("out/s3-to-s3/model.safetensors.index.json"),
        std::fs::read(tmp.path().join("out/s3-to-s3/model.safetensors.index.json")).unwrap()
    );
    // --overwrite with a single shard: the old shards and index go, the new file is complete.
    s3.pma()
        .args([
            "merge",
            "--quiet",
            "--overwrite",
            "--run",
            &s3.url("runs/bf16"),
        ])
        .args(["--method", "wma", "--out", &s3.url("out/s3-to-s3")])
        .assert()
        .success();
    let keys = s3.keys("out/s3-to-s3");
    assert!(
        keys.contains(&"out/s3-to-s3/model.safetensors".to_string()),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("index.json") || k.contains("-of-")),
        "{keys:?}"
    );
    let wma = tmp.path().join("wma");
    pma()
        .args(["merge", "--quiet", "--method", "wma", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(&wma)
        .assert()
        .success();
    let got = tmp.path().join("wma-from-s3");
    s3.download("out/s3-to-s3", &got);
    assert_same_checkpoint(&wma, &got);
}

/// A partitioned merge with its output on S3 (a Kubernetes Indexed Job with no shared
/// filesystem): the parts upload beside OUT, the finalize copies their objects into place with
/// the index last, and the output is the single-process merge's, object for object. A part
/// killed before its manifest, a stale part and a replaced object are each refused by the
/// finalize, which then publishes nothing. The same parts also merge S3 inputs to a shared
/// filesystem.
#[test]
fn partitioned_merge_to_s3_equals_the_single_process_merge() {
    let Some(s3) = s3("parts") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    s3.upload_dir(&run, "runs/bf16");
    let input = s3.url("runs/bf16");
    let merge = |method: &str, out: &str, extra: &[&str]| {
        let o = s3
            .pma()
            .args(["merge", "--quiet", "--method", method, "--run", &input])
            .args(["--max-shard-size", "3000", "--out", out])
            .args(extra)
            .output()
            .unwrap();
        assert_no_secret(&o);
        o
    };
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let refused = |o: std::process::Output, what: &str| {
        assert!(!o.status.success(), "expected a refusal: {what}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    ok(merge("sma", &s3.url("out/single"), &[]));
    let single = s3.snapshot("out/single");
    assert!(single.len() > 3, "{:?}", s3.keys("out/single"));

    let out = s3.url("out/parts");
    let part =
        |i: usize, method: &str| merge(method, &out, &["--part", &i.to_string(), "--parts", "3"]);
    let finalize = || merge("sma", &out, &["--finalize"]);
    for i in 0..3 {
        ok(part(i, "sma"));
    }
    // The parts wrote beside OUT, nothing at it.
    assert!(s3.keys("out/parts").is_empty());
    let staged = s3.keys("out/.parts.pma-parts");
    assert!(
        staged.contains(&"out/.parts.pma-parts/part-1-of-3/manifest.json".to_string()),
        "{staged:?}"
    );
    // A part killed early (before its shards and its manifest) is missing.
    let manifest = "out/.parts.pma-parts/part-1-of-3/manifest.json";
    let text = s3.get(manifest);
    let part_1 = s3.url("out/.parts.pma-parts/part-1-of-3");
    pma_format::remote::remove_prefix(Path::new(&part_1)).unwrap();
    assert!(s3.keys("out/.parts.pma-parts/part-1-of-3").is_empty());
    refused(finalize(), "part 1 of 3 is missing");
    assert!(s3.keys("out/parts").is_empty());
    // A part made with other weights is stale.
    ok(part(1, "ema"));
    refused(finalize(), "different plan");
    assert!(s3.keys("out/parts").is_empty());
    ok(part(1, "sma"));
    assert_eq!(
        s3.get(manifest),
        text,
        "a rerun part writes the same manifest"
    );
    // An object replaced after its part wrote it (same size, other bytes) is refused.
    let shard = staged
        .iter()
        .find(|k| k.contains("part-2-of-3/") && k.ends_with(".safetensors"))
        .expect("part 2 wrote a shard")
        .clone();
    let mut bytes = s3.get(&shard);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let mut writer = pma_format::remote::ObjectWriter::create(Path::new(&s3.url(&shard))).unwrap();
    writer.write(&bytes).unwrap();
    writer.finish().unwrap();
    refused(finalize(), "was replaced after its part wrote it");
    assert!(s3.keys("out/parts").is_empty());
    ok(part(2, "sma"));
    // Reading every object back against its CRC-32 finds them all intact.
    ok(merge("sma", &out, &["--finalize", "--verify-parts"]));
    let got: Vec<(String, Vec<u8>)> = s3
        .snapshot("out/parts")
        .into_iter()
        .map(|(k, b)| (k.replacen("out/parts/", "out/single/", 1), b))
        .collect();
    assert_eq!(
        got.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        single.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(
        got == single,
        "the partitioned output differs from the single-process one"
    );
    assert!(s3.keys("out/.parts.pma-parts").is_empty());
    s3.assert_no_open_uploads();
    // A published output is not overwritten by a part without --overwrite.
    refused(part(0, "sma"), "out/parts");

    // S3 inputs, parts on a shared filesystem: the same bytes.
    let local = tmp.path().join("local-out");
    let local_out = local.to_str().unwrap();
    for i in 0..2 {
        ok(merge(
            "sma",
            local_out,
            &["--part", &i.to_string(), "--parts", "2"],
        ));
    }
    ok(merge("sma", local_out, &["--finalize"]));
    for (key, bytes) in &single {
        let rel = &key["out/single/".len()..];
        assert_eq!(&std::fs::read(local.join(rel)).unwrap(), bytes, "{rel}");
    }
}

/// Runs `cmd` to completion and returns (success, its peak RSS in KiB), read by `wait4` on
/// that very child (other children of the test process, a moto_server, do not count).
// The child is reaped by wait4 below, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut std::process::Command) -> (bool, i64) {
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 writes into the locals we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, usage.ru_maxrss)
}

/// A single-file checkpoint of one f32 tensor `w` of `n` elements, written block by block so
/// this process never holds it (its RSS would show in the child's peak until `exec`).
fn write_streamed(dir: &Path, n: usize, value: impl Fn(usize) -> f32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model_type":"llama"}"#).unwrap();
    let mut header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        n * 4
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for i in 0..n {
        f.write_all(&value(i).to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
}

#[test]
fn large_members_stream_by_ranged_reads_and_outputs_upload_in_parts() {
    let Some(s3) = s3("large") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Two members of 160 MB each: downloading even one of them whole would pass the RSS
    // bound asserted below.
    let n: usize = 40 << 20;
    let value = |i: usize, step: usize| ((i % 1000) as f32) * 0.25 + step as f32;
    for step in 0..2 {
        let dir = tmp.path().join(format!("step-{}", (step + 1) * 100));
        write_streamed(&dir, n, |i| value(i, step));
        s3.upload_dir(&dir, &format!("big/step-{}", (step + 1) * 100));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Run as a plain child so its peak RSS is ours to read.
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"));
    cmd.env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("PMA_S3_PART_BYTES", (8u64 << 20).to_string())
        .env("PMA_STAGING_DIR", tmp.path())
        .args([
            "merge",
            "--quiet",
            "--method",
            "sma",
            "--run",
            &s3.url("big"),
        ])
        .args(["--out", &s3.url("big-out")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let (ok, rss_kib) = run_measured(&mut cmd);
    assert!(ok);
    let rss_mib = rss_kib / 1024;
    // The bound: 64 MiB of prefetched blocks, the output's upload (at most 4 parts in flight
    // and one filling, 40 MiB here), the pipeline's batches and the binary; downloading one
    // member whole (160 MB) on top of the pipeline would pass it, as would staging the
    // output in memory.
    assert!(
        rss_mib < 200,
        "peak RSS {rss_mib} MiB for 320 MB of members: inputs or output were not streamed"
    );
    // 160 MiB and a header in 8 MiB parts: a multipart upload ("<md5>-<parts>", 21 parts).
    let info = pma_format::remote::head(Path::new(&s3.url("big-out/model.safetensors"))).unwrap();
    let parts = info.n_bytes.div_ceil(8 << 20);
    assert_eq!(parts, 21);
    let etag = s3.etag("big-out/model.safetensors");
    assert!(
        etag.ends_with(&format!("-{parts}")),
        "ETag {etag} is not a {parts}-part upload"
    );
    // The average is right: (x + (x + 1)) / 2 = x + 0.5, exact in f32 for these values.
    let out = s3.get("big-out/model.safetensors");
    let header_len = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
    let data = &out[8 + header_len..];
    assert_eq!(data.len(), n * 4);
    for i in [0, 1, 999, 1000, n / 2 + 7, n - 1] {
        let got = f32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(got, ((i % 1000) as f32) * 0.25 + 0.5, "element {i}");
    }
    // Nothing of the staging folder is left behind.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn missing_key_is_one_clear_error_and_publishes_nothing() {
    let Some(s3) = s3("missing") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    s3.upload_dir(&run.join("step-0000100"), "runs/bf16/step-0000100");
    let out = tmp.path().join("out");
    let missing = s3.url("runs/bf16/step-0000999");
    let o = s3
        .pma()
        .args(["merge", "--quiet", "--method", "sma"])
        .args([&s3.url("runs/bf16/step-0000100"), &missing])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&missing) && err.contains("404"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
    // An empty run prefix, and an output to S3 that is never published.
    let o = s3
        .pma()
        .args([
            "merge",
            "--quiet",
            "--method",
            "sma",
            "--run",
            &s3.url("no-such-run"),
        ])
        .args(["--out", &s3.url("o")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no-such-run") && err.contains("404"), "{err}");
    assert!(s3.keys("o").is_empty());
    assert_no_secret(&o);
}

#[test]
fn merge_failing_mid_upload_leaves_nothing_at_the_output() {
    let Some(s3) = s3("midfail") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // 3M f32 elements (12 MB, three jobs) per member; with one thread a batch is two jobs, so
    // the first batch (8 MB) starts the output's multipart upload (5 MiB parts) before the
    // second reaches the NaN near the end of step 200.
    let n: usize = 3 << 20;
    for step in [100, 200] {
        let dir = tmp.path().join(format!("step-{step}"));
        write_streamed(&dir, n, |i| {
            if step == 200 && i == n - 10 {
                f32::NAN
            } else {
                (i % 7) as f32
            }
        });
        s3.upload_dir(&dir, &format!("nan/step-{step}"));
    }
    let o = s3
        .pma()
        .env("PMA_S3_PART_BYTES", (5u64 << 20).to_string())
        .env("PMA_STAGING_DIR", tmp.path())
        .args(["merge", "--quiet", "--threads", "1", "--method", "sma"])
        .args(["--run", &s3.url("nan")])
        .args(["--out", &s3.url("nan-out")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("non-finite") || err.contains("NaN"), "{err}");
    // The sidecar uploaded before the shards and the aborted shard are both gone, so a rerun
    // is not refused as an existing output.
    assert!(s3.keys("nan-out").is_empty(), "{:?}", s3.keys("nan-out"));
    let uploads = s3.request("GET", &format!("/{}?uploads", s3.bucket), b"");
    assert!(
        !String::from_utf8_lossy(&uploads.2).contains("<UploadId>"),
        "multipart uploads left open: {}",
        String::from_utf8_lossy(&uploads.2)
    );
}

impl S3 {
    /// Every object under `prefix/` with its bytes, sorted by key.
    fn snapshot(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.keys(prefix)
            .into_iter()
            .map(|k| {
                let bytes = self.get(&k);
                (k, bytes)
            })
            .collect()
    }

    /// Fails when a multipart upload of the bucket is still open.
    fn assert_no_open_uploads(&self) {
        let uploads = self.request("GET", &format!("/{}?uploads", self.bucket), b"");
        assert!(
            !String::from_utf8_lossy(&uploads.2).contains("<UploadId>"),
            "multipart uploads left open: {}",
            String::from_utf8_lossy(&uploads.2)
        );
    }
}

/// Regression: `--overwrite` of an S3 output used to delete the old output before the merge
/// ran, so a merge failing midway lost it. The old output must stay byte for byte as it was.
#[test]
fn overwrite_failing_mid_upload_leaves_the_old_output_byte_identical() {
    let Some(s3) = s3("owfail") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // As in merge_failing_mid_upload_leaves_nothing_at_the_output: the second batch reaches a
    // NaN after the output's multipart upload has started. A run without the NaN makes the
    // old output, whose keys (model.safetensors, config.json) the failing merge also writes.
    let n: usize = 3 << 20;
    for (run, nan) in [("good", false), ("nan", true)] {
        for step in [100, 200] {
            let dir = tmp.path().join(run).join(format!("step-{step}"));
            write_streamed(&dir, n, |i| {
                if nan && step == 200 && i == n - 10 {
                    f32::NAN
                } else {
                    ((i + step) % 7) as f32
                }
            });
            s3.upload_dir(&dir, &format!("{run}/step-{step}"));
        }
    }
    let merge = |run: &str| {
        s3.pma()
            .env("PMA_S3_PART_BYTES", (5u64 << 20).to_string())
            .env("PMA_STAGING_DIR", tmp.path())
            .args(["merge", "--quiet", "--overwrite", "--threads", "1"])
            .args(["--method", "sma", "--run", &s3.url(run)])
            .args(["--out", &s3.url("out")])
            .output()
            .unwrap()
    };
    let o = merge("good");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = s3.snapshot("out");
    assert_eq!(
        before.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["out/config.json", "out/model.safetensors"]
    );
    let o = merge("nan");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("non-finite") || err.contains("NaN"), "{err}");
    // The same keys (no staging left behind) and the same bytes.
    assert!(s3.snapshot("out") == before, "{:?}", s3.keys("out"));
    s3.assert_no_open_uploads();
}

/// `--overwrite` of a sharded S3 output: with the same shard names (the staged shards are
/// copied into place) and with fewer shards (the stale ones are deleted after the commit),
/// the result is exactly the local merge's files, with nothing of the old output left.
#[test]
fn overwrite_replaces_shards_and_leaves_no_stale_object() {
    let Some(s3) = s3("owshards") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    s3.upload_dir(&run, "runs/bf16");
    // 12 shards, 12 shards again (other bytes under the same names), then 6.
    for (method, shard_bytes) in [("sma", "5000"), ("ema", "5000"), ("wma", "12000")] {
        let local = tmp.path().join(format!("local-{method}"));
        pma()
            .args(["merge", "--quiet", "--method", method, "--run"])
            .arg(&run)
            .args(["--max-shard-size", shard_bytes, "--out"])
            .arg(&local)
            .assert()
            .success();
        let o = s3
            .pma()
            .args(["merge", "--quiet", "--overwrite", "--method", method])
            .args([
                "--run",
                &s3.url("runs/bf16"),
                "--max-shard-size",
                shard_bytes,
            ])
            .args(["--out", &s3.url("ow")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let want: Vec<String> = common::listing(&local)
            .into_iter()
            .filter(|f| !f.ends_with('/'))
            .map(|f| format!("ow/{f}"))
            .collect();
        assert_eq!(s3.keys("ow"), want, "{method}");
        let got = tmp.path().join(format!("got-{method}"));
        s3.download("ow", &got);
        assert_same_checkpoint(&local, &got);
    }
    s3.assert_no_open_uploads();
}

fn dcp_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pma-format/tests/fixtures/dcp")
}

/// DCP runs on S3 (torch.save items, re-sharded 2 -> 4 ranks, SAFETENSORS serialization), found
/// by listing, read by ranged GETs: the merge, `inspect` and `diff` equal the local ones bit for
/// bit, and the merges equal the fixtures' expected merges (computed outside pma).
#[test]
fn dcp_runs_on_s3_merge_bit_identical_to_local() {
    let Some(s3) = s3("dcp") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let steps = [
        "step-0000100",
        "step-0000200",
        "step-0000300",
        "step-0000400",
    ];
    for run in ["run-single", "run-resharded", "run-safetensors"] {
        let local_run = dcp_fixtures().join(run);
        for step in steps {
            s3.upload_dir(&local_run.join(step), &format!("{run}/{step}"));
        }
        for (method, expected) in [
            (&["--method", "sma"][..], "sma-n4"),
            (&["--method", "ema", "--alpha", "0.2"][..], "ema0.2-n4"),
        ] {
            let local = tmp
                .path()
                .join(format!("{run}-{expected}-local.safetensors"));
            pma()
                .args(["merge", "--quiet", "--run"])
                .arg(&local_run)
                .args(method)
                .arg("--out")
                .arg(&local)
                .assert()
                .success();
            let remote = tmp.path().join(format!("{run}-{expected}-s3.safetensors"));
            let o = s3
                .pma()
                .args(["merge", "--quiet", "--run", &s3.url(run)])
                .args(method)
                .arg("--out")
                .arg(&remote)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{run}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_no_secret(&o);
            let got = common::read_tensors(&remote);
            assert!(got == common::read_tensors(&local), "{run} {expected}");
            let want = local_run.join(format!("expected/{expected}.safetensors"));
            assert!(got == common::read_tensors(&want), "{run} {expected}");
        }
        let member = |step: &str| format!("{}/{step}", s3.url(run));
        let json = |cmd: &mut assert_cmd::Command, key: &str| {
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            v[key]["tensors"].clone()
        };
        let shown = json(
            s3.pma().args(["inspect", "--json", &member(steps[3])]),
            "inspect",
        );
        let local_shown = json(
            pma()
                .args(["inspect", "--json"])
                .arg(local_run.join(steps[3])),
            "inspect",
        );
        assert_eq!(shown, local_shown, "{run}");
        let diffed = json(
            s3.pma()
                .args(["diff", "--json", &member(steps[0]), &member(steps[3])]),
            "diff",
        );
        let local_diffed = json(
            pma()
                .args(["diff", "--json"])
                .arg(local_run.join(steps[0]))
                .arg(local_run.join(steps[3])),
            "diff",
        );
        assert_eq!(diffed, local_diffed, "{run}");
        assert!(diffed.as_array().is_some_and(|a| !a.is_empty()));
    }
    // A checkpoint whose `.metadata` names a `.distcp` object that is not there.
    let broken = tmp.path().join("broken");
    common::copy_tree(&dcp_fixtures().join("run-single/step-0000200"), &broken);
    std::fs::remove_file(broken.join("__0_0.distcp")).unwrap();
    s3.upload_dir(&broken, "broken/step-0000200");
    let out = tmp.path().join("never.safetensors");
    let o = s3
        .pma()
        .args(["merge", "--quiet", "--method", "sma"])
        .args([
            &format!("{}/step-0000100", s3.url("run-single")),
            &s3.url("broken/step-0000200"),
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&s3.url("broken/step-0000200")) && err.contains("__0_0.distcp"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());
    assert_no_secret(&o);
    // A DCP output partitioned to a store is refused clearly, before anything is written.
    let o = s3
        .pma()
        .args([
            "merge",
            "--quiet",
            "--method",
            "sma",
            "--run",
            &s3.url("run-single"),
        ])
        .args(["--part", "0", "--parts", "2", "--out", &s3.url("dcp-parts")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("partition a DCP output on a shared filesystem"),
        "{err}"
    );
    assert!(s3.keys("dcp-parts").is_empty() && s3.keys(".dcp-parts.pma-parts").is_empty());
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bad_credential_is_one_clear_error_naming_url_and_status() {
    // moto checks credentials only when told to; this test starts its own server that does,
    // so the shared one stays open to the other tests.
    let Some(_shared) = s3("badcred") else { return };
    let required = std::env::var("PMA_REQUIRE_S3").is_ok_and(|v| v == "1");
    let Some(moto) = std::env::var_os("PMA_MOTO_SERVER") else {
        assert!(
            !required,
            "PMA_REQUIRE_S3=1 needs PMA_MOTO_SERVER (the moto_server binary)"
        );
        eprintln!("SKIPPED bad_credential: set PMA_MOTO_SERVER");
        return;
    };
    let port = free_port();
    let _server = Child(
        std::process::Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "moto_server did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = "s3://pma-badcred/run/step-100";
    let mut cmd = pma();
    aws_env(&mut cmd, &endpoint);
    let o = cmd
        .args(["merge", "--quiet", "--method", "sma", url, "--out"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(url) && err.contains("HTTP 403"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_no_secret(&o);
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn unreachable_endpoint_fails_clearly_within_bounded_time() {
    // Needs no server: a closed port on loopback.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let url = "s3://pma-nowhere/run";
    let mut cmd = pma();
    aws_env(&mut cmd, &format!("http://127.0.0.1:{port}"));
    let start = Instant::now();
    let o = cmd
        .args(["merge", "--quiet", "--method", "sma", "--run", url, "--out"])
        .arg(tmp.path().join("out"))
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(!o.status.success());
    assert!(secs < 30.0, "took {secs:.1} s");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(url) && err.contains("listing"), "{err}");
    assert_no_secret(&o);
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn watch_polls_an_s3_run_by_listing_and_matches_the_local_watch() {
    let Some(s3) = s3("watch") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = bf16_run(tmp.path());
    // The first three checkpoints now, the fourth after the first pass.
    for step in ["step-0000100", "step-0000200", "step-0000300"] {
        s3.upload_dir(&run.join(step), &format!("runs/w/{step}"));
    }
    let args = [
        "--method", "sma", "--last", "2", "--once", "--settle", "0", "--quiet",
    ];
    let remote_out = tmp.path().join("remote-watch");
    let watch = |out: &Path| {
        let o = s3
            .pma()
            .args(["watch", &s3.url("runs/w"), "--out"])
            .arg(out)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    watch(&remote_out);
    s3.upload_dir(&run.join("step-0000400"), "runs/w/step-0000400");
    watch(&remote_out);
    let local_out = tmp.path().join("local-watch");
    pma()
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&local_out)
        .args(args)
        .assert()
        .success();
    let steps = common::output_steps(&local_out);
    assert_eq!(steps, common::output_steps(&remote_out));
    assert!(steps.contains(&"step-0000400".to_string()), "{steps:?}");
    for step in &steps {
        let (a, b) = (local_out.join(step), remote_out.join(step));
        // The tensors; the watcher's provenance names the run, which differs.
        assert_eq!(common::read_tensors(&a), common::read_tensors(&b), "{step}");
    }
    // The watcher's own output must be local: an s3:// --out is refused clearly.
    let o = s3
        .pma()
        .args(["watch", &s3.url("runs/w"), "--out", &s3.url("watch-out")])
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("local directory"));
}
