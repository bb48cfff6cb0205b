//! Network faults without privileges: a fault-injecting TCP proxy on every link of the run.
//!
//! Each node dials each peer (and the runner's client dials each node) through a proxy of its
//! own, so a link between two parties is the pair of proxies between them. A link can be
//! slowed (every chunk held `delay` ± `jitter` ms, order kept), made lossy (a lost segment
//! costs what TCP pays for it, a retransmission timeout of 200 ms, Linux's minimum), or cut:
//! the bytes of its connections go nowhere and new connections are accepted and left silent,
//! as a partition looks to both ends (no FIN, no RST: the failure detector must notice).
//! When a cut link heals, the connections that lived through the cut are closed (their
//! streams lost bytes) and the nodes dial again.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;

use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::run::*;

/// What a link does to its traffic now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LinkState {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Share of chunks lost (each costs a retransmission timeout).
    pub loss: f64,
    pub cut: bool,
}

/// What a lost segment costs: Linux's minimum retransmission timeout.
const RTO_MS: u64 = 200;

/// One proxied connection.
struct Conn {
    /// The link was cut while this connection lived: it closes when the link heals.
    poisoned: AtomicBool,
    close: Notify,
    closed: AtomicBool,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.close.notify_waiters();
    }
}

#[derive(Default)]
struct Link {
    state: LinkState,
    conns: Vec<Weak<Conn>>,
}

/// The proxies of a run and the state of every link.
pub(crate) struct Net {
    links: Mutex<HashMap<(String, String), Link>>,
    /// The fault each node's links carry, and whether its link to the client does too.
    node_faults: Mutex<HashMap<String, (LinkState, bool)>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    seed: u64,
}

/// The party the runner's client is on a link.
pub(crate) const CLIENT: &str = "client";

/// The proxies of a run: every node dials each peer through a proxy of its own, the client
/// each node. Returns the proxies, a config file per node (its peers at their proxies, under
/// `dir`) and the client's config (every node at the client's proxy to it).
pub(crate) async fn wire(
    cfg: &ClusterConfig,
    dir: &Path,
    seed: u64,
) -> Result<(Arc<Net>, HashMap<String, PathBuf>, ClusterConfig)> {
    let net = Net::new(seed);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let real: Vec<(String, SocketAddr)> = cfg
        .nodes
        .iter()
        .map(|n| Ok((n.name.clone(), n.addr.parse()?)))
        .collect::<Result<_>>()?;
    let mut files = HashMap::new();
    let mut parties: Vec<&str> = real.iter().map(|(n, _)| n.as_str()).collect();
    parties.push(CLIENT);
    // the paths of a loaded config are absolute: its copies mean the same under `dir`
    let mut client_cfg = cfg.clone();
    for from in parties {
        let mut view = cfg.clone();
        for (i, (to, addr)) in real.iter().enumerate() {
            if to != from {
                view.nodes[i].addr = net.proxy(from, to, *addr).await?.to_string();
            }
        }
        if from == CLIENT {
            client_cfg = view;
        } else {
            let path = dir.join(format!("{from}.toml"));
            std::fs::write(&path, toml::to_string(&view)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            files.insert(from.to_string(), path);
        }
    }
    Ok((net, files, client_cfg))
}

/// The unordered pair naming a link.
pub(crate) fn key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl Net {
    pub(crate) fn new(seed: u64) -> Arc<Net> {
        Arc::new(Net {
            links: Mutex::new(HashMap::new()),
            node_faults: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            seed,
        })
    }

    /// Starts a proxy for traffic from `from` to `to` (listening on a free local port, which
    /// it returns) that forwards to `target`.
    pub(crate) async fn proxy(
        self: &Arc<Net>,
        from: &str,
        to: &str,
        target: SocketAddr,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let k = key(from, to);
        self.links
            .lock()
            .expect("net")
            .entry(k.clone())
            .or_default();
        let net = self.clone();
        let task = tokio::spawn(async move {
            let mut n: u64 = 0;
            while let Ok((inbound, _)) = listener.accept().await {
                n += 1;
                let net = net.clone();
                let k = k.clone();
                let seed = net.seed ^ n ^ ((target.port() as u64) << 20);
                tokio::spawn(async move { net.serve(k, inbound, target, seed).await });
            }
        });
        self.tasks.lock().expect("net").push(task);
        Ok(local)
    }

    /// Sets the state of the link between `a` and `b`; healing a cut closes the connections
    /// that lived through it.
    pub(crate) fn set(&self, a: &str, b: &str, state: LinkState) {
        let mut links = self.links.lock().expect("net");
        let link = links.entry(key(a, b)).or_default();
        let was_cut = link.state.cut;
        link.state = state;
        link.conns.retain(|c| c.strong_count() > 0);
        for c in link.conns.iter().filter_map(Weak::upgrade) {
            if state.cut {
                c.poisoned.store(true, Ordering::SeqCst);
            } else if was_cut && c.poisoned.load(Ordering::SeqCst) {
                c.close();
            }
        }
    }

    /// Puts `fault` on every link of `node` (to each of `peers`, and to [`CLIENT`] when
    /// `client`), or takes it off (`None`). A link's state joins the faults of both its
    /// ends: cut if either is, delays added, the larger loss.
    pub(crate) fn set_node(&self, node: &str, fault: Option<(LinkState, bool)>, peers: &[String]) {
        let mut faults = self.node_faults.lock().expect("net");
        match fault {
            Some(f) => faults.insert(node.to_string(), f),
            None => faults.remove(node),
        };
        let of = |n: &str, other: &str| -> LinkState {
            match faults.get(n) {
                Some((s, client)) if other != CLIENT || *client => *s,
                _ => LinkState::default(),
            }
        };
        let mut others: Vec<&str> = peers.iter().map(String::as_str).collect();
        others.push(CLIENT);
        for o in others.into_iter().filter(|o| *o != node) {
            let (a, b) = (of(node, o), of(o, node));
            self.set(
                node,
                o,
                LinkState {
                    delay_ms: a.delay_ms + b.delay_ms,
                    jitter_ms: a.jitter_ms + b.jitter_ms,
                    loss: a.loss.max(b.loss),
                    cut: a.cut || b.cut,
                },
            );
        }
    }

    /// The state of the link between `a` and `b`.
    pub(crate) fn state(&self, a: &str, b: &str) -> LinkState {
        self.links
            .lock()
            .expect("net")
            .get(&key(a, b))
            .map(|l| l.state)
            .unwrap_or_default()
    }

    async fn serve(
        self: Arc<Net>,
        k: (String, String),
        inbound: TcpStream,
        target: SocketAddr,
        seed: u64,
    ) {
        let conn = Arc::new(Conn {
            poisoned: AtomicBool::new(false),
            close: Notify::new(),
            closed: AtomicBool::new(false),
        });
        // made before the connection is listed: a close from then on wakes it
        let closed = conn.close.notified();
        tokio::pin!(closed);
        let cut_now = {
            let mut links = self.links.lock().expect("net");
            let link = links.entry(k.clone()).or_default();
            link.conns.push(Arc::downgrade(&conn));
            link.state.cut
        };
        let _ = inbound.set_nodelay(true);
        if cut_now {
            // a partition: the dialler sees a connection that never answers, until the heal
            conn.poisoned.store(true, Ordering::SeqCst);
            let (mut r, _w) = inbound.into_split();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    _ = &mut closed => return,
                    n = r.read(&mut buf) => if !matches!(n, Ok(n) if n > 0) { return },
                }
            }
        }
        let Ok(outbound) = TcpStream::connect(target).await else {
            // the node is down: the dialler sees its connection closed, as a refused port
            return;
        };
        let _ = outbound.set_nodelay(true);
        let (ir, iw) = inbound.into_split();
        let (or, ow) = outbound.into_split();
        let up = pump(self.clone(), k.clone(), conn.clone(), ir, ow, seed);
        let down = pump(self.clone(), k, conn.clone(), or, iw, seed ^ 0xdead);
        tokio::select! {
            _ = async { tokio::join!(up, down) } => {}
            _ = &mut closed => {}
        }
    }

    /// Stops every proxy (their connections close with the tasks).
    pub(crate) fn shutdown(&self) {
        for t in self.tasks.lock().expect("net").drain(..) {
            t.abort();
        }
        for link in self.links.lock().expect("net").values() {
            for c in link.conns.iter().filter_map(Weak::upgrade) {
                c.close();
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Carries one direction of a connection: reads chunks, holds each as the link says, writes
/// them in order; while the link is cut, what arrives goes nowhere.
async fn pump(
    net: Arc<Net>,
    k: (String, String),
    conn: Arc<Conn>,
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u64,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let writer = {
        let conn = conn.clone();
        async move {
            while let Some((due, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if conn.closed.load(Ordering::SeqCst) || w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        }
    };
    let reader = async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut last_due = tokio::time::Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let s = {
                let links = net.links.lock().expect("net");
                links.get(&k).map(|l| l.state).unwrap_or_default()
            };
            if conn.closed.load(Ordering::SeqCst) {
                break;
            }
            if s.cut {
                conn.poisoned.store(true, Ordering::SeqCst);
                continue;
            }
            let mut hold = s.delay_ms;
            if s.jitter_ms > 0 {
                hold = (hold + rng.gen_range(0..=2 * s.jitter_ms)).saturating_sub(s.jitter_ms);
            }
            if s.loss > 0.0 && rng.gen_bool(s.loss.min(1.0)) {
                hold += RTO_MS;
            }
            let due = (tokio::time::Instant::now() + Duration::from_millis(hold)).max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn a_delayed_link_holds_every_chunk_and_keeps_the_order() {
        let net = Net::new(1);
        let p = net.proxy("a", "b", echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(p).await.unwrap();
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
        let quick = t.elapsed();
        net.set(
            "b",
            "a",
            LinkState {
                delay_ms: 150,
                ..LinkState::default()
            },
        );
        let t = Instant::now();
        for i in 0..3u8 {
            assert_eq!(round_trip(&mut s, &[i; 100]).await.unwrap(), vec![i; 100]);
        }
        // both directions held: at least 2 x 150 ms a round trip
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        assert!(quick < Duration::from_millis(300), "{quick:?}");
    }

    #[tokio::test]
    async fn a_cut_link_is_silent_and_its_connections_close_when_it_heals() {
        let net = Net::new(2);
        let p = net.proxy("a", "b", echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(p).await.unwrap();
        assert_eq!(round_trip(&mut s, b"x").await.unwrap(), b"x");
        net.set(
            "a",
            "b",
            LinkState {
                cut: true,
                ..LinkState::default()
            },
        );
        assert!(net.state("b", "a").cut);
        // no answer, no close: silence
        let r = tokio::time::timeout(Duration::from_millis(400), round_trip(&mut s, b"y")).await;
        assert!(r.is_err(), "a cut link answered: {r:?}");
        // a new connection is accepted and stays silent too
        let mut s2 = TcpStream::connect(p).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), round_trip(&mut s2, b"z")).await;
        assert!(r.is_err(), "a connection opened during the cut answered");
        net.set("a", "b", LinkState::default());
        // the connections that lived through the cut are closed: reads end
        let mut buf = [0u8; 8];
        let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
        let end = tokio::time::timeout(Duration::from_secs(5), s2.read(&mut buf)).await;
        assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
        // and a new one works
        let mut s3 = TcpStream::connect(p).await.unwrap();
        assert_eq!(round_trip(&mut s3, b"w").await.unwrap(), b"w");
    }

    #[tokio::test]
    async fn a_lossy_link_pays_a_retransmission_timeout_per_lost_chunk() {
        let net = Net::new(3);
        let p = net.proxy("a", "b", echo_server().await).await.unwrap();
        net.set(
            "a",
            "b",
            LinkState {
                loss: 1.0,
                ..LinkState::default()
            },
        );
        let mut s = TcpStream::connect(p).await.unwrap();
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"lossy").await.unwrap(), b"lossy");
        assert!(
            t.elapsed() >= Duration::from_millis(2 * RTO_MS),
            "{:?}",
            t.elapsed()
        );
    }
}
