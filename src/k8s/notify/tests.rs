use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::time::Instant;

use super::*;
use crate::config::Problem;

use crate::testing::TempDir;

/// What the kubelet's atomic writer (pkg/volume/util/atomic_writer.go) does to a volume:
/// the new content in a new timestamped directory, a `..data_tmp` link to it renamed over
/// `..data`, then the user-visible links for new keys made and those of removed keys
/// deleted, then the old directory removed. `pause` goes between the steps, as a busy
/// node's would.
fn kubelet_update(vol: &Path, generation: u32, files: &[(&str, &str)], pause: Duration) {
    let ts = format!("..2026_12_03_08_00_{generation:02}.{}", 100 + generation);
    std::fs::create_dir(vol.join(&ts)).unwrap();
    for (k, v) in files {
        std::fs::write(vol.join(&ts).join(k), v).unwrap();
    }
    let old = std::fs::read_link(vol.join("..data")).ok();
    std::os::unix::fs::symlink(&ts, vol.join("..data_tmp")).unwrap();
    std::thread::sleep(pause);
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    std::thread::sleep(pause);
    for (k, _) in files {
        let _ = std::os::unix::fs::symlink(format!("..data/{k}"), vol.join(k));
    }
    for entry in std::fs::read_dir(vol).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.iter().any(|(k, _)| *k == name) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    std::thread::sleep(pause);
    if let Some(old) = old {
        std::fs::remove_dir_all(vol.join(old)).unwrap();
    }
}

fn retry(attempts: u32) -> NotifyRetry {
    NotifyRetry { attempts, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(40) }
}

/// A watch on `vol` whose only way to tell is a request to `port`.
fn watch_config(vol: &Path, port: u16, debounce: Duration) -> NotifyConfig {
    NotifyConfig {
        name: "app-config".into(),
        paths: vec![vol.to_owned()],
        debounce,
        http: Some(NotifyHttp {
            url: format!("http://127.0.0.1:{port}/-/reload"),
            method: "POST".into(),
            timeout: Duration::from_secs(2),
            headers: Default::default(),
        }),
        signal: None,
        retry: retry(3),
    }
}

/// A tiny HTTP app on a thread: answers each request with the next status of `statuses`
/// (then 200) and hands the request's text over `seen`.
fn app(statuses: Vec<u16>) -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Head, then as much body as Content-Length says.
            loop {
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned)
                        })
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let status = statuses.next().unwrap_or(200);
            let _ = write!(conn, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx.send(String::from_utf8_lossy(&req).into_owned()).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

fn metrics() -> (Metrics, Registry) {
    let mut r = crate::telemetry::metrics::registry();
    (Metrics::register(&mut r), r)
}

fn exposition(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).unwrap();
    out
}

/// Polls the file watcher fast, so a test's debounce is what it waits for.
const POLL: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_update_is_one_notification_and_a_rewrite_of_the_same_content_none() {
    let dir = TempDir::new("notify-kubelet");
    let vol = dir.path("config");
    std::fs::create_dir(&vol).unwrap();
    kubelet_update(&vol, 1, &[("app.yaml", "a: 1\n"), ("old.yaml", "x")], Duration::ZERO);
    let (port, seen) = app(vec![]);
    let files = FileWatcher::start(POLL).unwrap();
    let (m, registry) = metrics();
    let debounce = Duration::from_millis(300);
    let cfg = Arc::new(Config { notify: vec![watch_config(&vol, port, debounce)], ..smallest() });
    let (cfg_tx, cfg_rx) = watch::channel(cfg);
    let (drain, drain_watch) = crate::drain::Drain::new();
    start(cfg_rx, files.clone(), m, drain_watch).unwrap();
    // The baseline is taken at once; then a slow kubelet (100 ms between its steps, the
    // dangling links of removed keys seen by polls in between) changes one key, adds one
    // and removes one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let vol2 = vol.clone();
    tokio::task::spawn_blocking(move || {
        kubelet_update(&vol2, 2, &[("app.yaml", "a: 2\n"), ("new.yaml", "n")], Duration::from_millis(100))
    })
    .await
    .unwrap();
    let req = seen.recv_timeout(Duration::from_secs(5)).expect("one request");
    assert!(req.starts_with("POST /-/reload HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("content-type: application/json\r\n"), "{req}");
    let body: serde_json::Value = serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    let p = |f: &str| vol.join(f).to_string_lossy().into_owned();
    assert_eq!(
        body,
        serde_json::json!({ "watch": "app-config", "changed": [p("app.yaml"), p("new.yaml"), p("old.yaml")] })
    );
    assert!(seen.recv_timeout(debounce * 3).is_err(), "a second notification for one update");

    // The same content again, as a new generation: new directory, new `..data`, new inodes.
    tokio::task::spawn_blocking(move || {
        kubelet_update(&vol, 3, &[("app.yaml", "a: 2\n"), ("new.yaml", "n")], Duration::from_millis(50))
    })
    .await
    .unwrap();
    assert!(seen.recv_timeout(debounce * 3).is_err(), "notified of a rewrite that changed nothing");
    let shown = exposition(&registry);
    assert!(shown.contains("sidecar_notify_total{watch=\"app-config\",result=\"success\"} 1\n"), "{shown}");
    assert!(shown.contains("sidecar_notify_total{watch=\"app-config\",result=\"error\"} 0\n"), "{shown}");
    assert!(
        shown.contains("sidecar_notify_last_success_timestamp_seconds{watch=\"app-config\"} 1"),
        "{shown}"
    );

    // Removed by a reload: its series go with it.
    cfg_tx.send_replace(Arc::new(Config { notify: vec![], ..smallest() }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!exposition(&registry).contains("app-config"));
    drain.start();
    assert!(drain.wait(Duration::from_secs(2)).await, "the notify thread kept its drain handle");
}

#[tokio::test]
async fn a_failing_app_is_retried_until_it_answers_and_a_4xx_is_not_retried() {
    let (m, registry) = metrics();
    let wm = m.watch("w");
    let mut cfg = watch_config(Path::new("/x"), 0, Duration::from_secs(1));
    cfg.name = "w".into();
    let (port, seen) = app(vec![503, 503, 200, 404]);
    cfg.http.as_mut().unwrap().url = format!("http://127.0.0.1:{port}/reload");
    cfg.retry = retry(5);
    notify(&cfg, &[PathBuf::from("/x/a")], &wm).await;
    assert_eq!(seen.try_iter().count(), 3);
    notify(&cfg, &[PathBuf::from("/x/a")], &wm).await;
    assert_eq!(seen.try_iter().count(), 1, "a 404 is the app's answer, not retried");
    let shown = exposition(&registry);
    assert!(shown.contains("sidecar_notify_total{watch=\"w\",result=\"success\"} 1\n"), "{shown}");
    assert!(shown.contains("sidecar_notify_total{watch=\"w\",result=\"error\"} 1\n"), "{shown}");
    assert!(shown.contains("sidecar_notify_retries_total{watch=\"w\"} 2\n"), "{shown}");
}

#[tokio::test]
async fn an_app_that_is_not_listening_is_tried_attempts_times() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (m, _registry) = metrics();
    let wm = m.watch("w");
    let cfg = watch_config(Path::new("/x"), port, Duration::from_secs(1));
    let t = Instant::now();
    notify(&cfg, &[], &wm).await;
    assert_eq!(wm.retries.get(), 2);
    assert_eq!(wm.error.get(), 1);
    // Two waits of 5–10 ms then 10–20 ms.
    assert!(t.elapsed() >= Duration::from_millis(15), "{:?}", t.elapsed());
}

#[test]
fn backoff_doubles_to_its_cap_and_is_jittered_into_the_upper_half() {
    let r =
        NotifyRetry { attempts: 10, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(5) };
    let at = |n, u| backoff_delay(&r, n, u);
    assert_eq!(
        [at(1, 1.0), at(2, 1.0), at(3, 1.0), at(4, 1.0), at(9, 1.0)],
        [1, 2, 4, 5, 5].map(Duration::from_secs)
    );
    assert_eq!(at(1, 0.0), Duration::from_millis(500));
    assert_eq!(at(3, 0.5), Duration::from_secs(3));
    assert_eq!(at(u32::MAX, 1.0), Duration::from_secs(5), "no overflow");
}

#[test]
fn answers_are_judged_where_they_come() {
    let j = |c| match judge(http::StatusCode::from_u16(c).unwrap(), "u") {
        Outcome::Done(_) => "done",
        Outcome::Retry(_) => "retry",
        Outcome::Fail(_) => "fail",
    };
    assert_eq!(
        [200, 204, 503, 500, 429, 408, 404, 400, 302].map(j),
        ["done", "done", "retry", "retry", "retry", "retry", "fail", "fail", "fail"]
    );
}

#[test]
fn changed_files_names_what_changed_appeared_or_went() {
    let s = |v: &[(&str, u8)]| Snapshot {
        files: v.iter().map(|(p, d)| (PathBuf::from(p), FileState::Content([*d; 32]))).collect(),
    };
    let before = s(&[("/v/a", 1), ("/v/b", 1), ("/v/c", 1)]);
    let after = s(&[("/v/a", 1), ("/v/b", 2), ("/v/d", 1)]);
    assert_eq!(changed_files(&before, &after), ["/v/b", "/v/c", "/v/d"].map(PathBuf::from));
    assert!(changed_files(&before, &before).is_empty());
}

#[test]
fn processes_are_found_by_comm_or_argv0_topmost_only() {
    let dir = TempDir::new("notify-proc");
    let proc_ = |pid: i32, ppid: i32, state: char, comm: &str, cmdline: &[u8]| {
        let d = dir.path(&pid.to_string());
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("stat"), format!("{pid} ({comm}) {state} {ppid} 1 1 0 -1\n")).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
    };
    proc_(1, 0, 'S', "pause", b"/pause\0");
    proc_(10, 1, 'S', "nginx", b"nginx: master process /usr/sbin/nginx\0");
    proc_(11, 10, 'S', "nginx", b"nginx: worker process\0");
    proc_(12, 10, 'S', "nginx", b"nginx: worker process\0");
    proc_(20, 1, 'S', "python3", b"/usr/bin/python3\0app.py\0");
    proc_(21, 1, 'S', "a-very-long-exe", b"/opt/bin/a-very-long-executable\0");
    proc_(22, 1, 'Z', "myapp", b"");
    proc_(23, 1, 'S', "sidecar", b"/sidecar\0run\0");
    proc_(30, 1, 'S', "weird) S 1 (x", b"/bin/weird\0");
    std::fs::create_dir(dir.path("self")).unwrap();
    assert_eq!(find_processes(&dir.0, "nginx", 999), [10]);
    assert_eq!(find_processes(&dir.0, "python3", 999), [20]);
    assert_eq!(find_processes(&dir.0, "app.py", 999), Vec::<i32>::new(), "argv[0] only");
    assert_eq!(find_processes(&dir.0, "a-very-long-executable", 999), [21]);
    assert_eq!(find_processes(&dir.0, "myapp", 999), Vec::<i32>::new(), "zombies are not signalled");
    assert_eq!(find_processes(&dir.0, "sidecar", 23), Vec::<i32>::new(), "never itself");
    assert_eq!(find_processes(&dir.0, "weird", 999), [30]);
    assert_eq!(parse_stat("30 (weird) S 1 (x) S 1 1 1"), Some(('S', 1)));
}

#[test]
fn a_pid_file_must_hold_a_process_id() {
    let dir = TempDir::new("notify-pidfile");
    let f = dir.path("app.pid");
    assert!(read_pid_file(&f).unwrap_err().contains("No such file"));
    std::fs::write(&f, "1234\n").unwrap();
    assert_eq!(read_pid_file(&f), Ok(1234));
    std::fs::write(&f, "nope").unwrap();
    assert!(read_pid_file(&f).unwrap_err().contains("`nope` is not a process id"));
    std::fs::write(&f, "1").unwrap();
    assert!(read_pid_file(&f).is_err(), "never pid 1: the pause container or an init");
}

#[test]
fn a_signal_reaches_a_real_child_found_by_pid_file() {
    let dir = TempDir::new("notify-signal");
    // `sleep` takes SIGUSR1's default action: it dies of it, which we can see.
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let f = dir.path("app.pid");
    std::fs::write(&f, child.id().to_string()).unwrap();
    let s = NotifySignal { signal: SignalName::Usr1, target: ProcessTarget::PidFile(f.clone()) };
    assert!(matches!(send_signal(&s), Outcome::Done(_)));
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(10), "SIGUSR1 is 10 on Linux");
    // Gone (and reaped): retried, not failed.
    assert!(matches!(send_signal(&s), Outcome::Retry(_)), "{:?}", send_signal(&s));
    let missing = NotifySignal {
        signal: SignalName::Hup,
        target: ProcessTarget::Process("no-such-process-here".into()),
    };
    let Outcome::Retry(why) = send_signal(&missing) else { panic!() };
    assert!(why.contains("shareProcessNamespace: true"), "{why}");
}

fn smallest() -> Config {
    crate::config::parse(Path::new("t.yaml"), "notify: [{ name: x, paths: [/x], signal: { process: x } }]\n")
        .map_err(|e| e.problems)
        .unwrap_or_else(|p: Vec<Problem>| panic!("{p:?}"))
}
