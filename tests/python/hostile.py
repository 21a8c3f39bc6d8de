#!/usr/bin/env python3
"""Hostile and broken peers for the reliability tests (Python's ssl + h2, no mesh code).

garbage  HOST PORT N                 N connections that send random bytes, then reset.
stall    HOST PORT N SECONDS         N connections that send half a TLS record and wait.
streams  HOST PORT AUTHORITY N ...   mTLS + HTTP/2: N CONNECT streams that send data and never
                                     read the echo, held for a while, then the socket is reset.
bigheader HOST PORT AUTHORITY SIZE ... a CONNECT with a header of SIZE bytes.
idle     HOST PORT N STAGE SECONDS ... N mTLS connections that stop after STAGE (`tls`: the TLS
                                     handshake, no HTTP/2 preface; `h2`: the HTTP/2 handshake,
                                     PINGs answered, no stream); how long each stayed open.
hold     HOST PORT N ...             N mTLS + HTTP/2 connections (PINGs answered) held until
                                     killed; prints how many were set up, then keeps them.
vanish   HOST PORT AUTHORITY N PLAIN M ...  N CONNECT streams and M plaintext connections to
                                     PLAIN, each echoing once; prints `ready`, then holds them
                                     until killed (the test takes the link down meanwhile).
rapidreset HOST PORT AUTHORITY N ... N CONNECT streams each reset at once (CVE-2023-44487).
continuation HOST PORT AUTHORITY ... a header block split over a flood of CONTINUATION frames.
request  HOST PORT METHOD AUTHORITY ...  one request; its status.
(`...` is CA CERT KEY: the mTLS credentials.)
Prints one JSON line (`hold`, `vanish` and `stall` print one when set up, too).
"""
import json
import os
import selectors
import socket
import ssl
import struct
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import hyperframe.frame


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def garbage(host, port, n):
    done = 0
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=5)
        except ConnectionResetError:
            done += 1  # refused (reset) before the connect returned
            continue
        try:
            s.sendall(os.urandom(4096))
            s.settimeout(2)
            s.recv(4096)
        except OSError:
            pass  # reset by the server, which is fine
        finally:
            reset(s)
        done += 1
    return {"garbage": done}


def closed_now(s, wait):
    """Whether the peer closed or reset `s` (waits at most `wait` seconds)."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False


def stall(host, port, n, seconds):
    socks, reset_on_connect = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=5)
        except ConnectionResetError:
            reset_on_connect += 1  # refused (reset) before the connect returned
            continue
        try:
            s.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record header, and nothing after it
        except OSError:
            pass  # refused (reset) already
        socks.append(s)
    # Connections refused by a limit are reset as soon as they are accepted.
    time.sleep(0.3)
    refused = [s for s in socks if closed_now(s, 0.01)]
    print(json.dumps({"refused_at_once": reset_on_connect + len(refused)}), flush=True)
    time.sleep(seconds)
    closed = reset_on_connect + len(refused)
    for s in (s for s in socks if s not in refused):
        s.settimeout(0.5)
        try:
            if s.recv(1) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except OSError:
            pass
        s.close()
    return {"stalled": n, "closed_by_server": closed}


def tls(host, port, ca, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=None), raw


def streams(host, port, authority, n, ca, cert, key):
    sock, raw = tls(host, port, ca, cert, key)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    opened, refused = 0, 0
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        try:
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
            opened += 1
        except h2.exceptions.TooManyStreamsError:
            refused += 1
    sock.sendall(conn.data_to_send())
    # Send data on every stream that got a 200, never read what comes back.
    deadline = time.time() + 3
    sock.settimeout(0.2)
    ok = set()
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id not in ok:
                ok.add(event.stream_id)
                try:
                    conn.send_data(event.stream_id, b"x" * 16384)
                except Exception:
                    pass
        # Deliberately never acknowledge received data (no window updates).
        sock.sendall(conn.data_to_send())
        if len(ok) >= min(n, 200):
            time.sleep(1)
            break
    reset(sock)
    return {"opened": opened, "refused_locally": refused, "accepted": len(ok)}


def bigheader(host, port, authority, size, ca, cert, key):
    sock, raw = tls(host, port, ca, cert, key)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), ("x-big", "y" * size)])
    try:
        sock.sendall(conn.data_to_send())
    except OSError:
        return {"outcome": "closed while sending"}
    sock.settimeout(3)
    outcome = "no answer"
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                outcome = "closed"
                break
            for event in conn.receive_data(data):
                # The first answer counts (h2 resets the stream right after its 431).
                if outcome != "no answer":
                    break
                if isinstance(event, h2.events.ResponseReceived):
                    outcome = "status " + dict(event.headers)[b":status"].decode()
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    outcome = type(event).__name__
            sock.sendall(conn.data_to_send())
            if outcome != "no answer":
                break
    except (OSError, h2.exceptions.ProtocolError) as e:
        outcome = type(e).__name__
    reset(sock)
    return {"outcome": outcome}


def h2_client(host, port, ca, cert, key):
    """mTLS + the HTTP/2 preface and SETTINGS; (tls socket, h2 connection)."""
    sock, _ = tls(host, port, ca, cert, key)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def pump(sock, conn, wait):
    """Reads what the server sent within `wait` seconds and answers it (PING → PONG). Returns
    the events, or None once the server closed the connection."""
    sock.settimeout(wait)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return []
    except (OSError, ssl.SSLError):
        return None
    if not data:
        return None
    try:
        events = conn.receive_data(data)
    except h2.exceptions.ProtocolError:
        return None
    out = conn.data_to_send()
    if out:
        try:
            sock.sendall(out)
        except OSError:
            return None
    return events


def idle(host, port, n, stage, seconds, ca, cert, key):
    conns = []
    for _ in range(n):
        sock, raw = tls(host, port, ca, cert, key)
        conn = None
        if stage == "h2":
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
        conns.append((sock, conn, time.time()))
    sel = selectors.DefaultSelector()
    for i, (sock, _, _) in enumerate(conns):
        sel.register(sock, selectors.EVENT_READ, i)
    lifetimes = {}
    deadline = time.time() + seconds
    while len(lifetimes) < n and time.time() < deadline:
        for key_, _ in sel.select(timeout=0.1):
            i = key_.data
            sock, conn, started = conns[i]
            if conn is None:
                try:
                    sock.settimeout(0.1)
                    gone = sock.recv(65536) == b""
                except socket.timeout:
                    continue
                except (OSError, ssl.SSLError):
                    gone = True
            else:
                gone = pump(sock, conn, 0.1) is None
            if gone:
                lifetimes[i] = time.time() - started
                sel.unregister(sock)
    for sock, _, _ in conns:
        sock.close()
    times = sorted(lifetimes.values())
    return {"closed": len(times), "min_seconds": times[0] if times else None,
            "max_seconds": times[-1] if times else None}


def hold(host, port, n, ca, cert, key):
    conns, refused = [], 0
    for _ in range(n):
        try:
            sock, conn = h2_client(host, port, ca, cert, key)
            # The server's SETTINGS (and its first PING) arrive at once on a connection it set up.
            events = pump(sock, conn, 2)
            if events is None or not events:
                refused += 1
                sock.close()
                continue
            conns.append((sock, conn))
        except (OSError, ssl.SSLError):
            refused += 1
    print(json.dumps({"held": len(conns), "refused": refused}), flush=True)
    sel = selectors.DefaultSelector()
    for sock, conn in conns:
        sel.register(sock, selectors.EVENT_READ, conn)
    while True:  # until killed; PINGs are answered so that nothing but the limits applies
        for key_, _ in sel.select(timeout=1):
            if pump(key_.fileobj, key_.data, 0.1) is None:
                sel.unregister(key_.fileobj)


def echo_once(send, recv):
    send(b"ping")
    got = b""
    deadline = time.time() + 5
    while len(got) < 4 and time.time() < deadline:
        chunk = recv()
        if chunk is None:
            break
        got += chunk
    return got == b"ping"


def vanish(host, port, authority, n, plain, m, ca, cert, key):
    sock, conn = h2_client(host, port, ca, cert, key)
    sids = []
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        sids.append(sid)
    sock.sendall(conn.data_to_send())
    ok, echoed = set(), {}
    deadline = time.time() + 10
    while len(echoed) < n and time.time() < deadline:
        events = pump(sock, conn, 0.2)
        if events is None:
            break
        for event in events:
            if isinstance(event, h2.events.ResponseReceived) and dict(event.headers)[b":status"] == b"200":
                ok.add(event.stream_id)
                conn.send_data(event.stream_id, b"ping")
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(len(event.data), event.stream_id)
                echoed[event.stream_id] = echoed.get(event.stream_id, b"") + event.data
        sock.sendall(conn.data_to_send())
    streams = sum(1 for v in echoed.values() if v == b"ping")
    plain_host, plain_port = plain.rsplit(":", 1)
    plains = []
    for _ in range(m):
        s = socket.create_connection((plain_host, int(plain_port)), timeout=5)
        if echo_once(s.sendall, lambda: s.recv(4096) or None):
            plains.append(s)
    print(json.dumps({"ready": True, "streams": streams, "plaintext": len(plains)}), flush=True)
    while True:  # holds everything (no reads, so no PONG once the link is gone) until killed
        time.sleep(1)


def rapidreset(host, port, authority, n, ca, cert, key):
    sock, conn = h2_client(host, port, ca, cert, key)
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    sock.sendall(conn.data_to_send())
    return {"goaway": goaway(sock, conn)}


def goaway(sock, conn):
    """The error code and debug data of the server's GOAWAY (waits at most 5 s), or what
    happened instead. Frames are parsed raw: the h2 library's state may not know the streams
    a test wrote by hand."""
    buf = b""
    deadline = time.time() + 5
    sock.settimeout(0.5)
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except (OSError, ssl.SSLError):
            return "closed"
        if not data:
            return "closed"
        buf += data
        while len(buf) >= 9:
            frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9:9 + length]))
            buf = buf[9 + length:]
            if isinstance(frame, hyperframe.frame.GoAwayFrame):
                name = h2.errors.ErrorCodes(frame.error_code).name
                return name + ((" " + frame.additional_data.decode()) if frame.additional_data else "")
    return "no answer"


def continuation(host, port, authority, ca, cert, key):
    sock, conn = h2_client(host, port, ca, cert, key)
    block = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", authority)]
        + [("x-pad-%d" % i, "v" * 20) for i in range(40)]
    )
    # Raw frames on stream 1, unknown to the h2 library's state: HEADERS without END_HEADERS,
    # then CONTINUATION frames of 16 bytes each.
    chunks = [block[i:i + 16] for i in range(0, len(block), 16)]
    headers = hyperframe.frame.HeadersFrame(1)
    headers.data = chunks[0]
    out = headers.serialize()
    for chunk in chunks[1:]:
        frame = hyperframe.frame.ContinuationFrame(1)
        frame.data = chunk
        out += frame.serialize()
    sock.sendall(out)
    return {"continuations": len(chunks) - 1, "goaway": goaway(sock, conn)}


def request(host, port, method, authority, ca, cert, key):
    sock, conn = h2_client(host, port, ca, cert, key)
    headers = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        headers += [(":scheme", "https"), (":path", "/")]
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=method != "CONNECT")
    sock.sendall(conn.data_to_send())
    deadline = time.time() + 5
    while time.time() < deadline:
        events = pump(sock, conn, 0.5)
        if events is None:
            return {"status": "closed"}
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                reset(sock)
                return {"status": dict(event.headers)[b":status"].decode()}
            if isinstance(event, h2.events.StreamReset):
                return {"status": "reset " + h2.errors.ErrorCodes(event.error_code).name}
    return {"status": "no answer"}


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    a = sys.argv[4:]
    if mode == "garbage":
        r = garbage(host, port, int(a[0]))
    elif mode == "stall":
        r = stall(host, port, int(a[0]), float(a[1]))
    elif mode == "streams":
        r = streams(host, port, a[0], int(a[1]), a[2], a[3], a[4])
    elif mode == "bigheader":
        r = bigheader(host, port, a[0], int(a[1]), a[2], a[3], a[4])
    elif mode == "idle":
        r = idle(host, port, int(a[0]), a[1], float(a[2]), a[3], a[4], a[5])
    elif mode == "hold":
        r = hold(host, port, int(a[0]), a[1], a[2], a[3])
    elif mode == "vanish":
        r = vanish(host, port, a[0], int(a[1]), a[2], int(a[3]), a[4], a[5], a[6])
    elif mode == "rapidreset":
        r = rapidreset(host, port, a[0], int(a[1]), a[2], a[3], a[4])
    elif mode == "continuation":
        r = continuation(host, port, a[0], a[1], a[2], a[3])
    elif mode == "request":
        r = request(host, port, a[0], a[1], a[2], a[3], a[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
