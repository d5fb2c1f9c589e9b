//! Lays out the shipped agent's machine code so that what runs when it
//! starts, links and idles sits together (`layout/trellis-agent.order`,
//! made by `deploy/agent-layout`; see there for why and how).
//!
//! Only for the build that ships (the `agent` profile, optimised for
//! size) on x86_64 Linux, where Rust links with LLD, which reads the
//! order; other linkers would refuse the option.

use std::env;
use std::path::Path;

fn main() {
    let order = "layout/trellis-agent.order";
    println!("cargo::rerun-if-changed={order}");
    let shipped = env::var("OPT_LEVEL").as_deref() == Ok("z");
    let lld = env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let path = Path::new(&dir).join(order);
    let listed = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
    if shipped && lld && listed {
        println!(
            "cargo::rustc-link-arg-bin=trellis-agent=-Wl,--symbol-ordering-file={}",
            path.display()
        );
        // Functions renamed since the list was made are skipped quietly:
        // the layout degrades, the build does not fail.
        println!("cargo::rustc-link-arg-bin=trellis-agent=-Wl,--no-warn-symbol-ordering");
    }
}
