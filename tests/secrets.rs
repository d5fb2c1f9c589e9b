//! Access-key secrets never reach the hub's database: only argon2 hashes do.

mod common;

use common::{Cli, HubProcess};

#[test]
fn the_database_holds_no_access_key_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let hub = HubProcess::start(&data);
    let admin = hub.admin_key();
    let cli = Cli::for_hub(&hub, &admin, &tmp.path().join("config"));
    let mut secrets = vec![admin.split_once(':').unwrap().1.to_owned()];
    for user in ["alice", "bob"] {
        let out = cli.ok(&["create", "user", user]);
        let key = out.lines().last().unwrap().trim().to_owned();
        secrets.push(key.split_once(':').unwrap().1.to_owned());
        // Use the key so any caching path runs too.
        let user_cli = Cli::for_hub(&hub, &key, &tmp.path().join("config"));
        user_cli.ok(&["whoami"]);
    }
    let out = cli.ok(&["create", "key", "--user", "alice", "--description", "ci"]);
    secrets.push(
        out.lines()
            .last()
            .unwrap()
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_owned(),
    );
    assert_eq!(secrets.len(), 4);
    for s in &secrets {
        assert_eq!(s.len(), 64, "secrets are 256-bit hex: {s}");
    }
    // Stop the hub hard, then read every file of the database (main file,
    // WAL and shared memory) as raw bytes.
    hub.kill9();
    let mut scanned = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("hub.db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        let text = String::from_utf8_lossy(&bytes);
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{name} contains an access-key secret"
            );
        }
    }
    assert!(scanned > 0, "found no database file in {}", data.display());
    // The key ids are there (so the scan looked at the right data), and
    // their hashes are argon2id.
    let mut all = Vec::new();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("hub.db")
        {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    let all = String::from_utf8_lossy(&all);
    assert!(
        all.contains(admin.split_once(':').unwrap().0),
        "the admin key id should be stored"
    );
    assert!(all.contains("$argon2id$"), "key hashes should be argon2id");
}

#[test]
fn the_admin_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hub");
    let hub = HubProcess::start(&data);
    let mode = std::fs::metadata(data.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = hub.admin_key();
    // A restart does not mint another key.
    hub.kill9();
    let hub = HubProcess::start(&data);
    assert_eq!(hub.admin_key(), key);
}
