//! A forwarder between one relay and the broker that sees its publishes, so a
//! test can tell who published what, and when, from outside the relays.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::faults::{url_addr, url_via};
use crate::unix_secs;

#[derive(Clone, Debug)]
pub struct TappedPublish {
    /// When the `basic.publish` frame left the relay (read by the tap).
    pub at: SystemTime,
    pub message_id: Option<String>,
}

impl TappedPublish {
    pub fn at_secs(&self) -> f64 {
        unix_secs(self.at)
    }
}

/// Forwards TCP between a relay and RabbitMQ, both ways, byte for byte, and
/// parses the client-to-broker stream just enough to log each `basic.publish`
/// with its time and message-id. Plain threads and blocking sockets: simple,
/// and independent of the test's runtime.
pub struct AmqpTap {
    /// The AMQP URL the relay should use (the broker's, with the tap's address).
    pub url: String,
    addr: SocketAddr,
    publishes: Arc<Mutex<Vec<TappedPublish>>>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl AmqpTap {
    pub fn start(broker_url: &str) -> AmqpTap {
        assert!(
            broker_url.starts_with("amqp://"),
            "the tap forwards plain AMQP only"
        );
        let upstream = url_addr(broker_url, 5672);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tap");
        let addr = listener.local_addr().unwrap();
        let url = url_via(broker_url, addr.port());

        let publishes = Arc::new(Mutex::new(Vec::new()));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (pubs, socks, stopping) = (publishes.clone(), sockets.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut s = socks.lock().unwrap();
                    s.push(client.try_clone().unwrap());
                    s.push(server.try_clone().unwrap());
                }
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Write);
                });
                let (mut from_client, mut to_server) = (client, server);
                let pubs = pubs.clone();
                std::thread::spawn(move || {
                    let mut parser = FrameParser::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let now = SystemTime::now();
                        if to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let found = parser.feed(&buf[..n], now);
                        if !found.is_empty() {
                            pubs.lock().unwrap().extend(found);
                        }
                    }
                    let _ = to_server.shutdown(Shutdown::Write);
                });
            }
        });
        AmqpTap {
            url,
            addr,
            publishes,
            sockets,
            stop,
        }
    }

    pub fn publishes(&self) -> Vec<TappedPublish> {
        self.publishes.lock().unwrap().clone()
    }

    pub fn count(&self, wanted: impl Fn(&TappedPublish) -> bool) -> usize {
        self.publishes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| wanted(p))
            .count()
    }

    pub fn publishes_after(&self, t: SystemTime) -> Vec<TappedPublish> {
        self.publishes().into_iter().filter(|p| p.at >= t).collect()
    }
}

impl Drop for AmqpTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Just enough AMQP 0-9-1 framing to find `basic.publish` and the message-id
/// in the content header that follows it on the same channel.
#[derive(Default)]
struct FrameParser {
    buf: Vec<u8>,
    past_protocol_header: bool,
    publish_at: HashMap<u16, SystemTime>,
}

impl FrameParser {
    fn feed(&mut self, data: &[u8], now: SystemTime) -> Vec<TappedPublish> {
        self.buf.extend_from_slice(data);
        let mut found = Vec::new();
        let mut pos = 0;
        if !self.past_protocol_header {
            if self.buf.len() < 8 {
                return found;
            }
            if self.buf.starts_with(b"AMQP") {
                pos = 8;
            }
            self.past_protocol_header = true;
        }
        while self.buf.len() - pos >= 7 {
            let b = &self.buf[pos..];
            let kind = b[0];
            let channel = u16::from_be_bytes([b[1], b[2]]);
            let size = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
            if b.len() < 7 + size + 1 {
                break;
            }
            let payload = &b[7..7 + size];
            match kind {
                // method frame: basic (60) . publish (40)
                1 if payload.len() >= 4 && payload[..4] == [0, 60, 0, 40] => {
                    self.publish_at.insert(channel, now);
                }
                // content header frame
                2 => {
                    if let Some(at) = self.publish_at.remove(&channel) {
                        found.push(TappedPublish {
                            at,
                            message_id: header_message_id(payload),
                        });
                    }
                }
                _ => {}
            }
            pos += 7 + size + 1;
        }
        self.buf.drain(..pos);
        found
    }
}

/// The message-id property of a content header frame payload.
fn header_message_id(p: &[u8]) -> Option<String> {
    // class-id(2) weight(2) body-size(8) property-flags(2), then the properties
    // present, in flag order from bit 15 down.
    let flags = u16::from_be_bytes([*p.get(12)?, *p.get(13)?]);
    let mut pos = 14;
    let shortstr = |pos: &mut usize| -> Option<String> {
        let len = *p.get(*pos)? as usize;
        let s = p.get(*pos + 1..*pos + 1 + len)?;
        *pos += 1 + len;
        Some(String::from_utf8_lossy(s).into_owned())
    };
    let bit = |n: u16| flags & (1 << n) != 0;
    if bit(15) {
        shortstr(&mut pos)?; // content-type
    }
    if bit(14) {
        shortstr(&mut pos)?; // content-encoding
    }
    if bit(13) {
        let len = u32::from_be_bytes(p.get(pos..pos + 4)?.try_into().ok()?) as usize;
        pos += 4 + len; // headers
    }
    if bit(12) {
        pos += 1; // delivery-mode
    }
    if bit(11) {
        pos += 1; // priority
    }
    for n in [10, 9, 8] {
        if bit(n) {
            shortstr(&mut pos)?; // correlation-id, reply-to, expiration
        }
    }
    if bit(7) {
        return shortstr(&mut pos);
    }
    None
}
