//! Headless Chromium for the status page test: running it with a timeout
//! (and skipping when it is not installed), and reading the DOM it dumps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// A hung browser fails the test instead of hanging the suite.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

/// Chromium, or `None` (the test is skipped) when it is not installed and
/// not required.
pub fn browser() -> Option<PathBuf> {
    if Path::new(CHROMIUM).exists() {
        return Some(PathBuf::from(CHROMIUM));
    }
    if std::env::var("OUTPOST_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("{CHROMIUM} is missing and OUTPOST_REQUIRE_BROWSER=1 (apt-get install chromium)");
    }
    eprintln!(
        "SKIPPED the status page browser test: {CHROMIUM} is missing (apt-get install chromium, \
         or set OUTPOST_REQUIRE_BROWSER=1 to make this a failure)"
    );
    None
}

/// Runs headless Chromium with a fresh profile and `args`; returns its
/// stdout. Killed (and the test failed) after [`BROWSER_TIMEOUT`].
pub async fn run_browser(chromium: &Path, dir: &Path, args: Vec<String>, name: &str) -> String {
    let (chromium, dir, name) = (chromium.to_owned(), dir.to_owned(), name.to_owned());
    // Blocking waits off the runtime: the test's servers keep running.
    tokio::task::spawn_blocking(move || run_browser_blocking(&chromium, &dir, &args, &name))
        .await
        .expect("the browser thread")
}

fn run_browser_blocking(chromium: &Path, dir: &Path, args: &[String], name: &str) -> String {
    let profile = dir.join(format!("chromium-{name}"));
    let (out, err) = (
        dir.join(format!("{name}.out")),
        dir.join(format!("{name}.err")),
    );
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        // Files, not pipes: a full pipe cannot stall the browser.
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ({name}) did not finish within {BROWSER_TIMEOUT:?}: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium ({name}) failed ({status}): {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    std::fs::read_to_string(&out).expect("chromium's output")
}

/// `$CARGO_TARGET_DIR` (or `target/`): three levels above this test binary
/// (`<target>/debug/deps/tests-…`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps")
        .to_path_buf()
}

/// The DOM as Chromium serialized it, read just enough to find figures by
/// `id` and table rows by class.
pub struct Dom(pub String);

/// One element's attributes and its text up to the first child tag.
#[derive(Debug)]
pub struct Element {
    pub attrs: BTreeMap<String, String>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> String {
        self.attrs
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"))
            .clone()
    }
}

impl Dom {
    /// The element with `id` (it must exist).
    pub fn element(&self, id: &str) -> Element {
        let at = self
            .0
            .find(&format!(" id=\"{id}\""))
            .unwrap_or_else(|| panic!("no element #{id} in the rendered page"));
        let start = self.0[..at].rfind('<').unwrap();
        parse_element(&self.0[start..])
    }

    /// The attributes of every `<tr class="{class}">`, in page order.
    pub fn rows(&self, class: &str) -> Vec<BTreeMap<String, String>> {
        let needle = format!("<tr class=\"{class}\"");
        self.0
            .match_indices(&needle)
            .map(|(at, _)| parse_element(&self.0[at..]).attrs)
            .collect()
    }
}

/// `<tag a="v" …>text<…`: the attributes (unescaped) and the leading text.
fn parse_element(html: &str) -> Element {
    let end = html.find('>').expect("a whole tag");
    let tag = &html[1..end];
    let mut attrs = BTreeMap::new();
    let mut rest = tag.split_once(' ').map_or("", |(_, r)| r);
    while let Some((name, after)) = rest.split_once("=\"") {
        let (value, next) = after.split_once('"').expect("a closed attribute");
        attrs.insert(name.trim().to_string(), unescape(value));
        rest = next;
    }
    let text = html[end + 1..].split('<').next().unwrap_or("");
    Element {
        attrs,
        text: unescape(text),
    }
}

/// Undoes the HTML serializer's escapes.
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}
