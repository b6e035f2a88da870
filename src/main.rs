//! The `sidecar` command line: parse arguments, load the config, start logging, run.
//! `anyhow` lives here and in `app`; everything below returns typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use sidecar::app::{self, Exit};
use sidecar::config::{self, LogFormat};
use sidecar::demo;
use sidecar::k8s::inject;
use sidecar::telemetry::logging;
use sidecar::tls::certs;

/// jemalloc instead of glibc's malloc: after 500 slow readers left, glibc kept 42 MiB of
/// freed buffers (its per-thread arenas return little to the system), and mimalloc 56 MiB;
/// jemalloc's background thread purges freed pages within seconds (issue 9, bug 9).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "sidecar",
    version,
    about = "One small, fast binary beside your app: TLS, metrics, logs, readiness, drain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The config file (YAML).
        #[arg(short, long, env = "SIDECAR_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: print every problem, exit 1 if there is any.
    Check {
        #[arg(short, long, env = "SIDECAR_CONFIG")]
        config: PathBuf,
    },
    /// A sidecar in front of an embedded demo app, with URLs and curl lines to try.
    Demo {
        /// Where the sidecar listens.
        #[arg(long, default_value = "127.0.0.1:15006")]
        listen: SocketAddr,
        /// Where the sidecar serves HTTPS.
        #[arg(long, default_value = "127.0.0.1:15443")]
        https: SocketAddr,
        /// Where the sidecar serves HTTPS with client certificates required (mTLS).
        #[arg(long, default_value = "127.0.0.1:15444")]
        mtls: SocketAddr,
        /// Where the admin server listens (/metrics, /ready, ...).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Where the demo app listens; its two demo upstreams take ports the system picks.
        #[arg(long, default_value = "127.0.0.1:18080")]
        app: SocketAddr,
        /// Where the outbound (ambassador) listener the app would call listens.
        #[arg(long, default_value = "127.0.0.1:15001")]
        outbound: SocketAddr,
    },
    /// The embedded demo app alone, without a sidecar: the app container of a demo pod.
    DemoApp {
        /// Where the demo app listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The file it appends a JSON line a request to (created, with its directory).
        #[arg(long)]
        log_file: PathBuf,
    },
    /// Ask a running sidecar to drain (POST /shutdown) and wait until it has exited: a preStop hook.
    Drain {
        /// The sidecar's admin server.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Give up, with exit status 1, if the sidecar is still running after this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Only announce it (POST /prestop) and return at once: /ready turns 503 and the
        /// sidecar serves on until SIGTERM. The preStop hook `sidecar inject` writes.
        #[arg(long)]
        announce: bool,
    },
    /// Add Sidecar to the workloads in Kubernetes YAML: the result on stdout, a report on stderr.
    Inject {
        /// A file, a directory (its .yaml, .yml and .json files, recursively) or `-` for
        /// standard input; may be given more than once.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Add a plain container instead of a native sidecar (for clusters before 1.29).
        #[arg(long)]
        no_native: bool,
        /// The sidecar image (default sidecar:VERSION); a pod's sidecar.dev/image annotation wins.
        #[arg(long)]
        image: Option<String>,
        /// The ConfigMap holding sidecar.yaml (default sidecar-config); sidecar.dev/config wins.
        #[arg(long)]
        config_map: Option<String>,
    },
    /// The mutating admission webhook that injects Sidecar into pods as they are created.
    Webhook {
        /// The webhook's config file (YAML): listen address, serving certificate, defaults.
        #[arg(short, long, env = "SIDECAR_WEBHOOK_CONFIG")]
        config: PathBuf,
    },
    /// A dev CA and workload certificates, for mTLS without a mesh.
    Certs {
        #[command(subcommand)]
        action: CertsCommand,
    },
    /// Print the version, git commit and features.
    Version,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a new CA (ca.crt, and ca.key with mode 0600) into DIR.
    Init { dir: PathBuf },
    /// Write a workload certificate (tls.crt, tls.key with mode 0600, and ca.crt) into OUT.
    Issue {
        /// The CA directory written by `certs init`.
        #[arg(long)]
        ca: PathBuf,
        /// The workload's SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/web.
        #[arg(long)]
        spiffe: String,
        /// DNS names the certificate also serves (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        out: PathBuf,
    },
    /// The admission webhook's serving certificate and CA, and OUT/kustomization.yaml, an
    /// overlay of deploy/webhook with the Secret and caBundle: `kubectl apply -k OUT`.
    Webhook {
        /// The namespace the webhook runs in.
        #[arg(long, default_value = sidecar::k8s::webhook::install::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The webhook's Service, which the API server calls.
        #[arg(long, default_value = sidecar::k8s::webhook::install::DEFAULT_SERVICE)]
        service: String,
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    // Purge freed pages on jemalloc's own thread, on a timer, rather than only when some
    // later allocation happens to trigger it: an idle sidecar gives memory back too.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("sidecar: jemalloc background purging unavailable: {e}");
    }
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => return check(config),
        Command::Demo { listen, https, mtls, admin, app, outbound } => {
            let certs = std::env::temp_dir().join(format!("sidecar-demo-{}", listen.port()));
            // Placeholders: `start_app` binds the upstreams on free ports and records them.
            let upstreams = [SocketAddr::new(app.ip(), 0); 2];
            let logs = SocketAddr::new(app.ip(), 0);
            run_demo(demo::DemoAddrs { listen, https, mtls, admin, app, outbound, upstreams, logs, certs })
        }
        Command::DemoApp { listen, log_file } => {
            demo::run_app(listen, &log_file).context("demo app").map(|()| Exit::Drained)
        }
        Command::Drain { admin, timeout, announce } => drain(admin, timeout, announce),
        Command::Inject { files, no_native, image, config_map } => {
            let mut settings = inject::Settings { native: !no_native, ..Default::default() };
            settings.image = image.unwrap_or(settings.image);
            settings.config_map = config_map.unwrap_or(settings.config_map);
            return inject(&settings, &files);
        }
        Command::Webhook { config } => webhook(config),
        Command::Certs { action } => certs(action),
        Command::Version => {
            println!(
                "sidecar {} (commit {})\nfeatures: http1 http2 grpc websocket tcp tls mtls admin metrics access-log hot-reload outbound tracing logship notify inject webhook",
                env!("CARGO_PKG_VERSION"),
                env!("SIDECAR_GIT_COMMIT"),
            );
            Ok(Exit::Drained)
        }
    };
    match result {
        Ok(Exit::Drained) => ExitCode::SUCCESS,
        Ok(Exit::Forced) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sidecar: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Every connection is a file descriptor: lift the soft limit to the hard one, as Go and
/// Envoy do, so 1,000 slow clients cannot starve the rest of descriptors.
fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get()
        && soft < hard
    {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

fn check(path: PathBuf) -> ExitCode {
    let checked = config::load(&path).and_then(|c| {
        sidecar::tls::check_files(&path, &c)?;
        sidecar::logship::check_files(&path, &c)
    });
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// All or nothing: the output is printed only once every document has been injected.
fn inject(settings: &inject::Settings, files: &[PathBuf]) -> ExitCode {
    match inject::manifest::inject_files(settings, files) {
        Ok((yaml, lines)) => {
            print!("{yaml}");
            for line in &lines {
                eprintln!("{line}");
            }
            let injected = lines.iter().filter(|l| l.outcome == Some(inject::Outcome::Injected)).count();
            eprintln!("sidecar inject: {injected} of {} objects injected", lines.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecar inject: {e}");
            ExitCode::from(1)
        }
    }
}

fn drain(admin: SocketAddr, timeout: std::time::Duration, announce: bool) -> anyhow::Result<Exit> {
    if announce {
        sidecar::drain::client::announce(admin)?;
        eprintln!("sidecar at {admin}: not ready from now on; serving until SIGTERM");
        return Ok(Exit::Drained);
    }
    let took = sidecar::drain::client::drain(admin, timeout)?;
    eprintln!("sidecar at {admin}: drained and exited after {:.1}s", took.as_secs_f64());
    Ok(Exit::Drained)
}

fn webhook(path: PathBuf) -> anyhow::Result<Exit> {
    let file = config::webhook::load(&path)?;
    logging::init(&file.log_level, file.log_format)?;
    let clean = sidecar::k8s::webhook::run(file).context("webhook")?;
    if !clean {
        tracing::warn!("webhook: reviews still in flight at the end of the drain");
    }
    Ok(Exit::Drained)
}

fn certs(action: CertsCommand) -> anyhow::Result<Exit> {
    match action {
        CertsCommand::Webhook { namespace, service, out } => {
            sidecar::k8s::webhook::install::write(&namespace, &service, &out)?;
            println!(
                "wrote {out}/tls.crt, tls.key (0600) and ca.crt for {service}.{namespace}.svc, the CA in {out}/ca/, \
                 and {out}/kustomization.yaml: install with `kubectl apply -k {out}`",
                out = out.display()
            );
        }
        CertsCommand::Init { dir } => {
            certs::init(&dir)?;
            println!(
                "wrote {} and {} (0600)",
                dir.join(certs::CA_CERT).display(),
                dir.join(certs::CA_KEY).display()
            );
        }
        CertsCommand::Issue { ca, spiffe, dns, out } => {
            certs::issue(&ca, &spiffe, &dns, &out)?;
            println!(
                "wrote {}, {} (0600) and {} for {spiffe}",
                out.join(certs::LEAF_CERT).display(),
                out.join(certs::LEAF_KEY).display(),
                out.join(certs::CA_CERT).display()
            );
        }
    }
    Ok(Exit::Drained)
}

fn run(path: PathBuf) -> anyhow::Result<Exit> {
    // The same checks as `sidecar check`, with the same messages, before anything starts.
    let config = config::load(&path)?;
    sidecar::tls::check_files(&path, &config)?;
    let log = logging::init(&config.telemetry.log_level, config.telemetry.log_format)?;
    app::run(config, Some(path), Some(log))
}

fn run_demo(mut addrs: demo::DemoAddrs) -> anyhow::Result<Exit> {
    demo::make_certs(&addrs).context("writing the demo's certificates")?;
    // First: the config names the upstreams' ports, which binding chooses.
    demo::start_app(&mut addrs).context("starting the demo app and upstreams")?;
    let config = demo::config(&addrs)?;
    let log = logging::init(&config.telemetry.log_level, LogFormat::Text)?;
    eprintln!("{}", demo::banner(&addrs));
    app::run(config, None, Some(log))
}
