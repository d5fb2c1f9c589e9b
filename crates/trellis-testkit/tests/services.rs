//! The kit's PostgreSQL and SeaweedFS: started once and shared, usable,
//! and strict about credentials.

use std::process::Command;

#[test]
fn postgres_gives_each_test_its_own_database() {
    let Some(server) = trellis_testkit::postgres::server() else {
        return;
    };
    let a = server.database();
    let b = server.database();
    assert_ne!(a.name, b.name);
    a.sql("CREATE TABLE t (x INT)");
    a.sql("INSERT INTO t VALUES (7)");
    assert_eq!(a.sql("SELECT x FROM t"), "7");
    // The other database does not have it.
    let other = std::panic::catch_unwind(|| b.sql("SELECT x FROM t"));
    assert!(other.is_err());
    // The same server again, from a second call.
    let again = trellis_testkit::postgres::server().unwrap();
    assert_eq!(again.port(), server.port());
}

#[test]
fn seaweedfs_serves_s3_and_refuses_a_wrong_secret() {
    let Some(s3) = trellis_testkit::seaweedfs::server() else {
        return;
    };
    let bucket = s3.bucket();
    let put = |secret: &str| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args([
                "--data-binary",
                "hello",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
            ])
            // curl does not sign the body's hash; S3 accepts that when the
            // request says so.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--user")
            .arg(format!(
                "{}:{secret}",
                trellis_testkit::seaweedfs::ACCESS_KEY
            ))
            .arg(format!("{}/{bucket}/greeting", s3.endpoint))
            .output()
            .unwrap()
    };
    let ok = put(trellis_testkit::seaweedfs::SECRET_KEY);
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200");
    let refused = put("not-the-secret");
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "403");
}
