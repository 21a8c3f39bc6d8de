//! `mesh-bench`: the load generator and server of `cargo xtask bench`. A plain TCP application
//! (no mesh awareness), so it measures the mesh exactly as an application sees it.
//!
//! - `serve ADDR`: one server for every scenario; the client's first byte picks the mode:
//!   `T` read and discard until EOF, then answer the byte count (8 bytes, big endian);
//!   `R` echo 1 KiB messages; `C` read one byte, answer one byte, close; `I` hold the connection.
//! - `throughput ADDR SECONDS STREAMS`: bytes/s over STREAMS parallel connections.
//! - `rr ADDR RATE SECONDS`: 1 KiB request, 1 KiB response on one connection at RATE/s;
//!   latency percentiles. `RATE` 0 means back to back (the maximum rate).
//! - `connrate ADDR SECONDS`: new connections per second (connect, 1-byte exchange, close).
//! - `churn ADDR SECONDS`: like `connrate`, but keeps going after a failure and reports how
//!   many connections succeeded and failed (with the first errors).
//! - `idle ADDR COUNT`: opens COUNT connections, prints `open COUNT`, holds them until stdin
//!   closes or the process is killed.
//!
//! Every client prints one JSON line.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

const MSG: usize = 1024;

fn main() -> ExitCode {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a[..] {
        ["serve", addr] => serve(addr),
        ["throughput", addr, secs, streams] => throughput(addr, num(secs), num(streams)),
        ["rr", addr, rate, secs] => rr(addr, num(rate), num(secs)),
        ["connrate", addr, secs] => connrate(addr, num(secs)),
        ["idle", addr, count] => idle(addr, num(count)),
        ["churn", addr, secs] => churn(addr, num(secs)),
        _ => Err("usage: mesh-bench serve|throughput|rr|connrate|idle ...".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

/// Many connections need many descriptors: raise the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

fn serve(a: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr(a)?).map_err(|e| e.to_string())?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    std::io::stdout().flush().ok();
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).is_err() {
                return;
            }
            let _ = match mode[0] {
                b'T' => sink(&mut s),
                b'R' => echo(&mut s),
                b'C' => s.read_exact(&mut mode).and_then(|()| s.write_all(&mode)),
                _ => s.read(&mut mode).map(|_| ()),
            };
        });
    }
    Ok(())
}

fn sink(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes())
}

fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; MSG];
    loop {
        if s.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        s.write_all(&buf)?;
    }
}

fn connect(a: SocketAddr, mode: u8) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
        .map_err(|e| format!("connect {a}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(&[mode]).map_err(|e| e.to_string())?;
    Ok(s)
}

fn throughput(a: &str, secs: u64, streams: u64) -> Result<(), String> {
    let target = addr(a)?;
    let duration = Duration::from_secs(secs.max(1));
    let start = Instant::now();
    let workers: Vec<_> = (0..streams.max(1))
        .map(|_| {
            std::thread::spawn(move || -> Result<u64, String> {
                let mut s = connect(target, b'T')?;
                let buf = vec![0x5au8; 256 * 1024];
                let mut sent = 0u64;
                while start.elapsed() < duration {
                    s.write_all(&buf).map_err(|e| e.to_string())?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count).map_err(|e| e.to_string())?;
                let received = u64::from_be_bytes(count);
                if received != sent {
                    return Err(format!("sent {sent}, server counted {received}"));
                }
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| "worker panicked".to_owned())??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    let bps = total as f64 / elapsed;
    println!("{{\"bytes\":{total},\"seconds\":{elapsed:.3},\"bytes_per_second\":{bps:.0}}}");
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index"
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn rr(a: &str, rate: u64, secs: u64) -> Result<(), String> {
    let mut s = connect(addr(a)?, b'R')?;
    let req = [0x42u8; MSG];
    let mut resp = [0u8; MSG];
    let duration = Duration::from_secs(secs.max(1));
    let interval = (rate > 0).then(|| Duration::from_nanos(1_000_000_000 / rate));
    let mut latencies = Vec::new();
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < duration {
        if let Some(iv) = interval {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += iv;
        }
        let t = Instant::now();
        s.write_all(&req).map_err(|e| e.to_string())?;
        s.read_exact(&mut resp).map_err(|e| e.to_string())?;
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = latencies.len();
    latencies.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    let achieved = n as f64 / elapsed;
    println!(
        "{{\"requests\":{n},\"requests_per_second\":{achieved:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1}}}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99)
    );
    Ok(())
}

fn connrate(a: &str, secs: u64) -> Result<(), String> {
    let target = addr(a)?;
    let duration = Duration::from_secs(secs.max(1));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        let mut s = connect(target, b'C')?;
        s.write_all(b"x").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("exchange {n}: {e}"))?;
        drop(s);
        n += 1;
    }
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{{\"connections\":{n},\"connections_per_second\":{rate:.1}}}");
    Ok(())
}

fn churn(a: &str, secs: u64) -> Result<(), String> {
    let target = addr(a)?;
    let duration = Duration::from_secs(secs.max(1));
    let start = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    while start.elapsed() < duration {
        let attempt = connect(target, b'C').and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"x").map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).map_err(|e| e.to_string())
        });
        match attempt {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{e:?}"));
                }
            }
        }
    }
    println!(
        "{{\"ok\":{ok},\"failed\":{failed},\"errors\":[{}]}}",
        errors.join(",")
    );
    Ok(())
}

fn idle(a: &str, count: u64) -> Result<(), String> {
    let target = addr(a)?;
    let mut held = Vec::new();
    for i in 0..count {
        held.push(connect(target, b'I').map_err(|e| format!("connection {i}: {e}"))?);
    }
    println!("{{\"open\":{}}}", held.len());
    std::io::stdout().flush().ok();
    // Hold until told to stop (stdin closed or killed).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::thread::sleep(Duration::from_hours(1));
    Ok(())
}
