//! `mesh-testapp`: the plain TCP application the testbed runs in pods. It knows nothing about
//! the mesh (no marks, no proxies): an unmodified server and client whose output the tests
//! check.
//!
//! - `mesh-testapp echo ADDR`: echo server; prints `listening ADDR` once bound, echoes every
//!   connection until the peer half-closes, then half-closes back.
//! - `mesh-testapp client ADDR [BYTES]`: connects, sends BYTES (default 65536) of a pattern,
//!   half-closes, reads the echo to EOF and prints one JSON line with the peer address the
//!   kernel reports (`getpeername`), the byte counts, whether the bytes came back intact, and
//!   timings. Exits 1 on any failure.
//! - `mesh-testapp send ADDR TEXT`: sends TEXT once, half-closes, checks the echo.
//! - `mesh-testapp trickle ADDR SECONDS`: sends a small chunk ten times a second for SECONDS,
//!   then half-closes and checks the echo (a long-lived connection).
//! - `mesh-testapp many ADDR COUNT`: COUNT connections one after another, each sending a short
//!   text and checking its echo; prints one JSON line with how many succeeded and failed and
//!   each connection's time in milliseconds (`ms`, in order). Exits 0 whatever the outcome.
//! - `mesh-testapp hold ADDR COUNT SECONDS`: opens COUNT connections one after another, each
//!   checked with an echoed byte (3 s), and keeps those that answered; prints
//!   `{"ok":N,"failed":M}`, holds them for SECONDS, checks each still echoes, and prints
//!   `{"still_ok":K}`. Exits 0 whatever the outcome.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

const USAGE: &str = "usage: mesh-testapp echo ADDR | client ADDR [BYTES] | send ADDR TEXT | \
                     trickle ADDR SECONDS | many ADDR COUNT | hold ADDR COUNT SECONDS";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", addr] => echo(addr),
        ["client", addr] => client(addr, 65536),
        ["client", addr, bytes] => match bytes.parse() {
            Ok(n) => client(addr, n),
            Err(e) => Err(format!("BYTES: {e}")),
        },
        ["send", addr, text] => send(addr, text.as_bytes(), Duration::ZERO, 1),
        ["trickle", addr, seconds] => match seconds.parse::<u64>() {
            // 10 chunks a second.
            Ok(s) => send(
                addr,
                b"0123456789abcdef",
                Duration::from_millis(100),
                s * 10,
            ),
            Err(e) => Err(format!("SECONDS: {e}")),
        },
        ["many", addr, count] => match count.parse() {
            Ok(n) => many(addr, n),
            Err(e) => Err(format!("COUNT: {e}")),
        },
        ["hold", addr, count, seconds] => match (count.parse(), seconds.parse()) {
            (Ok(n), Ok(s)) => hold(addr, n, Duration::from_secs(s)),
            _ => Err("COUNT and SECONDS are numbers".to_owned()),
        },
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-testapp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("address {addr:?}: {e}"))
}

fn echo(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(parse(addr)?).map_err(|e| format!("bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            match echo_one(stream) {
                Ok(n) => println!("echoed {n} bytes for {peer}"),
                Err(e) => println!("connection from {peer} failed: {e}"),
            }
        });
    }
    Ok(())
}

fn echo_one(mut stream: TcpStream) -> std::io::Result<u64> {
    let mut reader = stream.try_clone()?;
    let n = std::io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)?;
    Ok(n)
}

/// Sends `chunk` `times` times with `pause` between, half-closes, and checks that exactly the
/// same bytes come back. Prints a JSON report like `client`.
fn send(addr: &str, chunk: &[u8], pause: Duration, times: u64) -> Result<(), String> {
    let target = parse(addr)?;
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect {target}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let mut sent = Vec::new();
    for i in 0..times {
        if i > 0 {
            std::thread::sleep(pause);
        }
        stream.write_all(chunk).map_err(|e| format!("write: {e}"))?;
        sent.extend_from_slice(chunk);
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut echo = Vec::new();
    stream
        .read_to_end(&mut echo)
        .map_err(|e| format!("read: {e}"))?;
    let intact = echo == sent;
    println!(
        "{{\"peer\":\"{peer}\",\"sent\":{},\"received\":{},\"intact\":{intact},\"total_us\":{}}}",
        sent.len(),
        echo.len(),
        start.elapsed().as_micros()
    );
    if intact {
        Ok(())
    } else {
        Err("echo mismatch".to_owned())
    }
}

/// The byte at `offset` of the pattern the client sends: position-dependent, so reordered,
/// dropped or duplicated data shows.
fn pattern(offset: u64) -> u8 {
    #[expect(clippy::cast_possible_truncation, reason = "byte pattern")]
    let b = (offset.wrapping_mul(31) ^ (offset >> 8)) as u8;
    b
}

fn client(addr: &str, bytes: u64) -> Result<(), String> {
    let target = parse(addr)?;
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect {target}: {e}"))?;
    let connect_us = start.elapsed().as_micros();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("getsockname: {e}"))?;

    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let chunk = usize::try_from((bytes - sent).min(buf.len() as u64)).unwrap_or(0);
            for (i, b) in buf[..chunk].iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            writer.write_all(&buf[..chunk])?;
            sent += chunk as u64;
        }
        writer.shutdown(Shutdown::Write)
    });

    let mut received = 0u64;
    let mut intact = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            intact &= *b == pattern(received + i as u64);
        }
        received += n as u64;
    }
    sender
        .join()
        .map_err(|_| "sender panicked".to_owned())?
        .map_err(|e| format!("write: {e}"))?;
    let total_us = start.elapsed().as_micros();
    intact &= received == bytes;
    println!(
        "{{\"peer\":\"{peer}\",\"local\":\"{local}\",\"sent\":{bytes},\"received\":{received},\
         \"intact\":{intact},\"connect_us\":{connect_us},\"total_us\":{total_us}}}"
    );
    if intact {
        Ok(())
    } else {
        Err(format!("echo mismatch: sent {bytes}, received {received}"))
    }
}

/// One short exchange on a new connection: `text` sent, half-closed, the echo checked.
fn exchange(target: SocketAddr, text: &[u8]) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream.write_all(text).map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut echo = Vec::new();
    stream
        .read_to_end(&mut echo)
        .map_err(|e| format!("read: {e}"))?;
    if echo == text {
        Ok(())
    } else {
        Err(format!(
            "echo mismatch: {} of {} bytes",
            echo.len(),
            text.len()
        ))
    }
}

fn many(addr: &str, count: u32) -> Result<(), String> {
    let target = parse(addr)?;
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut times = Vec::new();
    for i in 0..count {
        let start = Instant::now();
        match exchange(target, format!("connection {i}").as_bytes()) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
        times.push(format!("{:.1}", start.elapsed().as_secs_f64() * 1000.0));
    }
    println!(
        "{{\"ok\":{ok},\"failed\":{failed},\"ms\":[{}]}}",
        times.join(",")
    );
    Ok(())
}

/// One byte out and back on `stream`, within 3 s.
fn ping(mut stream: &TcpStream, byte: u8) -> bool {
    let mut buf = [0u8; 1];
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .is_ok()
        && stream.write_all(&[byte]).is_ok()
        && stream.read_exact(&mut buf).is_ok()
        && buf[0] == byte
}

fn hold(addr: &str, count: u32, seconds: Duration) -> Result<(), String> {
    let target = parse(addr)?;
    let mut open = Vec::new();
    let mut failed = 0u32;
    for _ in 0..count {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(stream) if ping(&stream, b'x') => open.push(stream),
            _ => failed += 1,
        }
    }
    println!("{{\"ok\":{},\"failed\":{failed}}}", open.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    std::thread::sleep(seconds);
    let still = open.iter().filter(|s| ping(s, b'y')).count();
    println!("{{\"still_ok\":{still}}}");
    Ok(())
}
