//! Control-protocol fuzzing against a live daemon: 100,000 random and mutated requests
//! (valid `add`/`del`/`list`/`apply` interleaved, valid JSON with wrong types and
//! values, unknown fields and commands, deep nesting, truncated lines, several lines at
//! once, lines over the size limit, binary garbage, connections closed without a word),
//! each on its own connection (the protocol's one request per connection), from a few
//! client threads at once. Every answer must be one line of JSON, `ok` or a one-line
//! error; afterwards the daemon is still running, and the rules added at the start are
//! listed unchanged and still forward real traffic.
//!
//! `PORTFWD_FUZZ_REQUESTS` (default 100,000) and `PORTFWD_FUZZ_SEED` (default fixed,
//! printed) size and reproduce a run; a bad answer prints its request.
//!
//! Needs root; skips without it, except under `CI=true`, where it fails.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use portfwd::protocol::{Request, MAX_REQUEST};
use portfwd_tests::fuzz::Rng;
use portfwd_tests::topology::{backend, body, published, udp_backend, Topology, CONTAINER_IPS};
use portfwd_tests::{client, env_u64};
use serde_json::{json, Value};

/// The rules that must survive: their host ports are never touched by a valid `del`.
const KEPT: [(u16, &str); 3] = [(9000, "tcp"), (9001, "tcp"), (9053, "udp")];
/// Client threads sending at once (the daemon serves up to 64 connections at once).
const THREADS: u64 = 4;

/// A request generator.
struct Gen {
    rng: Rng,
    /// Rules this client added (as the daemon answered), which its valid `del`s mostly
    /// remove: the rule table stays small, as a busy host's would.
    added: Vec<Value>,
}

impl Gen {
    fn host_ip(&mut self) -> Value {
        match self.rng.below(8) {
            0 => json!("0.0.0.0"),
            1 => json!("::"),
            2 => json!("198.18.0.1"),
            3 => json!("127.0.0.1"),
            4 => json!("::1"),
            _ => json!("*"),
        }
    }
    /// A host port of the fuzzing's own range (30000-30999), or open.
    fn port(&mut self) -> u64 {
        if self.rng.chance(2) {
            0
        } else {
            30_000 + self.rng.below(1000) as u64
        }
    }
    fn proto(&mut self) -> Value {
        json!(*self.rng.pick(&["tcp", "udp", "TCP", "Udp"]))
    }
    fn publish(&mut self, spec: bool) -> Value {
        let mut p =
            json!({ "host_port": if spec { self.port() } else { self.port().max(30_000) } });
        if self.rng.chance(70) {
            p["host_ip"] = self.host_ip();
        }
        if self.rng.chance(70) {
            p["proto"] = self.proto();
        }
        if self.rng.chance(15) {
            p["host_port_end"] = json!(p["host_port"].as_u64().unwrap_or(0) + 3);
        }
        p
    }
    fn backend(&mut self, ranged: bool) -> Value {
        let ip = CONTAINER_IPS[self.rng.below(2)].to_string();
        let mut b = json!({ "ip": ip, "port": 8080 });
        if ranged {
            b["port_end"] = json!(8083);
        }
        if self.rng.chance(5) {
            b["ip6"] = json!("2001:db8::2");
        }
        b
    }
    /// A valid request (the daemon may still refuse it: a port taken, a family
    /// mismatch). `reuse`: it is sent as is, so a `del` may take a rule added before
    /// (always, once this client holds more than 25).
    fn valid(&mut self, reuse: bool) -> Value {
        if reuse && self.added.len() > 25 {
            let i = self.rng.below(self.added.len());
            return json!({ "cmd": "del", "publish": self.added.swap_remove(i) });
        }
        match self.rng.below(100) {
            0..=39 => {
                let publish = self.publish(true);
                let ranged = publish.get("host_port_end").is_some() && self.rng.chance(70);
                json!({ "cmd": "add", "publish": publish, "backend": self.backend(ranged) })
            }
            40..=79 => {
                let publish = if reuse && !self.added.is_empty() && self.rng.chance(80) {
                    let i = self.rng.below(self.added.len());
                    self.added.swap_remove(i)
                } else {
                    self.publish(false)
                };
                json!({ "cmd": "del", "publish": publish })
            }
            80..=84 => json!({ "cmd": "list" }),
            _ => {
                let n = self.rng.below(4);
                let declarations: Vec<Value> = (0..n)
                    .map(|i| {
                        let mut publish = self.publish(true);
                        publish["host_port"] = json!(31_000 + self.rng.below(1000) as u64);
                        json!({
                            "line": i + 1,
                            "entry": "fuzzed",
                            "publish": publish,
                            "backend": self.backend(false),
                        })
                    })
                    .collect();
                json!({
                    "cmd": "apply",
                    "file": "fuzz.toml",
                    "dry_run": self.rng.chance(30),
                    "declarations": declarations,
                })
            }
        }
    }
    /// Any JSON value, of any type.
    fn any_value(&mut self, depth: usize) -> Value {
        match self.rng.below(if depth > 2 { 8 } else { 10 }) {
            0 => Value::Null,
            1 => json!(self.rng.chance(50)),
            2 => json!(self.rng.next_u64()),
            3 => json!(-(self.rng.below(70_000) as i64)),
            4 => json!(1.5e300),
            5 => json!(self.rng.below(70_000)),
            6 => json!(*self
                .rng
                .pick(&["", "tcp", "0.0.0.0", "::", "*", "x\ny", "\u{0}", "ü"])),
            7 => json!("9".repeat(1 + self.rng.below(40))),
            8 => Value::Array(
                (0..self.rng.below(4))
                    .map(|_| self.any_value(depth + 1))
                    .collect(),
            ),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.rng.below(4) {
                    let k = self
                        .rng
                        .pick(&["cmd", "publish", "backend", "host_port", "ip", "port", "x"])
                        .to_string();
                    m.insert(k, self.any_value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
    /// A valid request with one value, somewhere in it, of another type or value; or a
    /// field removed; or one added.
    fn wrong(&mut self) -> Value {
        let mut v = self.valid(false);
        let mut at = &mut v;
        loop {
            let keys: Vec<String> = match at.as_object() {
                Some(m) if !m.is_empty() => m.keys().cloned().collect(),
                _ => break,
            };
            let k = self.rng.pick(&keys).clone();
            let descend = at[&k].is_object() && self.rng.chance(60);
            if !descend {
                match self.rng.below(4) {
                    0 => {
                        at.as_object_mut().map(|m| m.remove(&k));
                    }
                    1 => at["unknown_field"] = self.any_value(1),
                    _ => at[&k] = self.any_value(1),
                }
                break;
            }
            at = &mut at[&k];
        }
        if self.rng.chance(5) {
            v["cmd"] = json!(*self
                .rng
                .pick(&["ADD", "shutdown", "", "list ", "apply\u{0}"]));
        }
        v
    }
    /// The bytes of one request, newline included or not.
    fn request(&mut self) -> Vec<u8> {
        let mut line = match self.rng.below(1000) {
            // A line over the limit, and one just under it (whitespace before the JSON).
            0 => vec![b'x'; MAX_REQUEST + 1 + self.rng.below(100)],
            1 => {
                let mut l = vec![b' '; MAX_REQUEST - 20];
                l.extend_from_slice(br#"{"cmd":"list"}"#);
                l
            }
            // Deep nesting.
            2..=9 => {
                let n = 1 + self.rng.below(5000);
                let mut l = br#"{"cmd":"add","publish":"#.to_vec();
                l.extend(std::iter::repeat_n(b'[', n));
                l.extend(std::iter::repeat_n(b']', n));
                l.push(b'}');
                l
            }
            10..=59 => {
                let n = self.rng.below(200);
                self.rng.bytes(n)
            }
            60..=69 => Vec::new(),
            // Sent whole: a `del` of a rule added before must reach the daemon.
            70..=399 => {
                let mut line = serde_json::to_vec(&self.valid(true)).expect("json");
                line.push(b'\n');
                return line;
            }
            _ => serde_json::to_vec(&self.wrong()).expect("json"),
        };
        // Then: truncated, a byte changed, a second line, or as it is.
        match self.rng.below(20) {
            0 | 1 if !line.is_empty() => {
                let n = self.rng.below(line.len());
                line.truncate(n);
            }
            2 | 3 if !line.is_empty() => {
                let i = self.rng.below(line.len());
                line[i] = self.rng.byte();
            }
            4 => line.extend_from_slice(b"\n{\"cmd\":\"list\"}"),
            _ => {}
        }
        if self.rng.chance(80) {
            line.push(b'\n');
        }
        line
    }
}

/// The request the daemon reads in `req`, if valid.
fn parsed(req: &[u8]) -> Option<Request> {
    let line = req.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).ok()
}

/// Whether `req` is a valid `del` of a kept rule: such requests are not sent (their
/// success would be right, and the end check wrong). A `del` naming an owner is refused
/// for the kept rules, which have none.
fn deletes_a_kept_rule(req: &Option<Request>) -> bool {
    match req {
        Some(Request::Del {
            publish,
            owner: None,
        }) => KEPT.iter().any(|&(port, _)| publish.ports().contains(port)),
        _ => false,
    }
}

/// Sends one request on its own connection; the answer, empty if none.
fn exchange(socket: &Path, req: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The daemon answers a request over the limit before reading it all.
    let _ = s.write_all(req);
    let _ = s.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    match s.read_to_end(&mut answer) {
        Ok(_) => answer,
        // Closed on us after answering a request over the limit.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => answer,
        Err(e) => panic!("reading the answer to {:?}: {e}", shown(req)),
    }
}

fn shown(req: &[u8]) -> String {
    let s = String::from_utf8_lossy(&req[..req.len().min(300)]).to_string();
    if req.len() > 300 {
        format!("{s}... ({} bytes)", req.len())
    } else {
        s
    }
}

/// Checks one answer: one line of JSON, `{"ok":true,...}` or `{"ok":false,"error":...}`
/// with a one-line message; nothing only for a connection that said nothing.
fn check(req: &[u8], answer: &[u8]) -> bool {
    let said_nothing = req
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .is_empty();
    if answer.is_empty() {
        assert!(said_nothing, "no answer to {:?}", shown(req));
        return false;
    }
    let text = std::str::from_utf8(answer)
        .unwrap_or_else(|e| panic!("answer not UTF-8 ({e}) to {:?}", shown(req)));
    let line = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("answer {text:?} without its newline, to {:?}", shown(req)));
    assert!(
        !line.contains('\n'),
        "a multi-line answer to {:?}",
        shown(req)
    );
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("answer not JSON ({e}): {line:?} to {:?}", shown(req)));
    match v["ok"].as_bool() {
        Some(true) => true,
        Some(false) => {
            let e = v["error"].as_str().unwrap_or_default();
            assert!(!e.is_empty(), "an empty error to {:?}", shown(req));
            false
        }
        None => panic!("answer without `ok`: {line} to {:?}", shown(req)),
    }
}

#[test]
fn control_requests_fuzzed() {
    let Some(mut topo) = Topology::with_daemon("control_requests_fuzzed", "fzc", "tc") else {
        return;
    };
    let requests = env_u64("PORTFWD_FUZZ_REQUESTS", 100_000);
    let seed = env_u64("PORTFWD_FUZZ_SEED", 0x5eed_c0de);
    eprintln!(
        "fuzz_control: seed {seed} (PORTFWD_FUZZ_SEED), {requests} requests \
         (PORTFWD_FUZZ_REQUESTS), {THREADS} clients"
    );
    let d = topo.daemon();
    d.add("9000", &backend(0));
    d.add("9001", &backend(1));
    d.add("9053/udp", &udp_backend(0));
    let kept: Vec<_> = d.rules().iter().map(|r| r.config()).collect();
    assert_eq!(kept.len(), KEPT.len(), "{kept:?}");
    let socket = d.socket().to_path_buf();

    let start = Instant::now();
    let totals: Vec<(u64, u64, u64)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let socket = &socket;
                s.spawn(move || {
                    let mut gen = Gen {
                        rng: Rng::new(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                        added: Vec::new(),
                    };
                    let (mut ok, mut refused, mut bytes) = (0, 0, 0);
                    let mut n = t;
                    while n < requests {
                        let req = gen.request();
                        let valid = parsed(&req);
                        if deletes_a_kept_rule(&valid) {
                            continue;
                        }
                        bytes += req.len() as u64;
                        let answer = exchange(socket, &req);
                        if check(&req, &answer) {
                            if let Some(Request::Add { .. }) = valid {
                                let v: Value = serde_json::from_slice(&answer).expect("JSON");
                                gen.added.push(v["publish"].clone());
                            }
                            ok += 1;
                        } else {
                            refused += 1;
                        }
                        n += THREADS;
                    }
                    (ok, refused, bytes)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("client thread"))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let (ok, refused, bytes) = totals
        .iter()
        .fold((0, 0, 0), |a, t| (a.0 + t.0, a.1 + t.1, a.2 + t.2));
    eprintln!(
        "fuzz_control: {requests} requests ({} MB) in {secs:.1} s ({:.0}/s): {ok} done, \
         {refused} refused or unanswered (empty); seed {seed}",
        bytes / 1_000_000,
        requests as f64 / secs
    );
    assert!(ok > requests / 20, "too few valid requests accepted: {ok}");

    // Still running, the kept rules listed unchanged, and forwarding.
    let d = topo.daemon_mut();
    assert!(
        d.child().try_wait().is_none(),
        "the daemon exited; its log:\n{}",
        d.log_text()
    );
    let d = topo.daemon();
    let now: Vec<_> = d.rules().iter().map(|r| r.config()).collect();
    eprintln!("fuzz_control: {} rules listed at the end", now.len());
    for rule in &kept {
        assert!(now.contains(rule), "rule {rule:?} lost; rules now: {now:?}");
    }
    assert_eq!(topo.get_published(9000).body_text(), body(0));
    assert_eq!(topo.get_published(9001).body_text(), body(1));
    let echo = client::udp_echo(&topo.client, published(9053), b"still here")
        .expect("UDP echo through 9053");
    assert_eq!(echo.payload, b"still here");
}
