//! The `geopush-worker` binary's operator commands, run as a real process: `hash-key`
//! prints an entry the API accepts, `import` writes a places file to the Redis store, and
//! `send-test` puts a notification in a user's inbox.

use anyhow::Context;
use geopush_gateway::api::keys::hash_key;
use geopush_tests::redis::RedisServer;
use std::path::PathBuf;
use std::process::Output;

/// `target/<profile>/geopush-worker`, beside the test binary's `deps/`.
fn worker_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in target/<profile>/deps")?
        .join(format!("geopush-worker{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        binary.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        binary.display()
    );
    Ok(binary)
}

fn run(args: &[&str]) -> Output {
    let binary = worker_binary().expect("binary");
    std::process::Command::new(binary)
        .args(args)
        .env_remove("GEOPUSH_REDIS_URL")
        .env_remove("GEOPUSH_API_KEYS")
        .output()
        .expect("runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn hash_key_prints_an_entry_of_the_key() {
    let out = run(&[
        "hash-key",
        "--generate",
        "--name",
        "billing",
        "--scopes",
        "publish+places",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .map(str::trim)
        .expect("a key line");
    let entry = stdout
        .lines()
        .find_map(|l| l.strip_prefix("entry:"))
        .map(str::trim)
        .expect("an entry line");
    assert_eq!(entry, format!("billing:{}:publish+places", hash_key(key)));
    assert!(
        !entry.contains(key),
        "the entry holds the hash, never the key"
    );

    let given = run(&["hash-key", "s3cret", "--name", "ops", "--scopes", "admin"]);
    assert!(given.status.success());
    assert_eq!(
        text(&given.stdout).trim(),
        format!("entry: ops:{}:admin", hash_key("s3cret"))
    );
    let bad = run(&["hash-key", "k", "--scopes", "root"]);
    assert!(!bad.status.success(), "an unknown scope fails");
    assert!(
        text(&bad.stderr).contains("unknown scope"),
        "{}",
        text(&bad.stderr)
    );
}

#[tokio::test]
async fn import_and_send_test_write_to_redis() {
    let redis = RedisServer::start().await.expect("redis");
    let url = redis.url();
    let dir = std::env::temp_dir().join(format!("geopush-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("places.ndjson");
    std::fs::write(
        &file,
        concat!(
            r#"{"type":"Feature","id":"a","geometry":{"type":"Point","coordinates":[13.4,52.5]},"properties":{"name":"A"}}"#,
            "\n",
            "not json\n",
            r#"{"type":"Feature","id":"b","geometry":{"type":"Point","coordinates":[2.35,48.85]},"properties":{"name":"B"}}"#,
            "\n"
        ),
    )
    .expect("write");
    let path = file.to_str().expect("utf-8 path");
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        let path = path.to_owned();
        move || run(&["--redis-url", &url, "import", &path])
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("imported 2 places, rejected 1 rows"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );

    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let places: usize = redis::cmd("HLEN")
        .arg("gp:{places}")
        .query_async(&mut conn)
        .await
        .expect("HLEN");
    assert_eq!(places, 2);

    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run(&["--redis-url", &url, "send-test", "--user", "alice"])
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 26, "a notification id: {id:?}");
    let inbox: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("gp:inbox:{alice}")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].1.get("id"), Some(&id));

    let no_redis = run(&["send-test", "--user", "alice"]);
    assert!(!no_redis.status.success(), "without Redis it fails");
    assert!(
        text(&no_redis.stderr).contains("needs Redis"),
        "{}",
        text(&no_redis.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
