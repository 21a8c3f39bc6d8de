#!/usr/bin/env python3
"""Hostile and broken peers for the reliability tests (Python's ssl + h2, no mesh code).

garbage  HOST PORT N                 N connections that send random bytes, then reset.
stall    HOST PORT N SECONDS         N connections that send half a TLS record and wait.
streams  HOST PORT AUTHORITY N ...   mTLS + HTTP/2: N CONNECT streams that send data and never
                                     read the echo, held for a while, then the socket is reset.
bigheader HOST PORT AUTHORITY ...    a CONNECT with a 64 KiB header.
Prints one JSON line.
"""
import json
import os
import socket
import ssl
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def garbage(host, port, n):
    done = 0
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        try:
            s.sendall(os.urandom(4096))
            s.settimeout(2)
            try:
                s.recv(4096)
            except OSError:
                pass
        finally:
            reset(s)
        done += 1
    return {"garbage": done}


def stall(host, port, n, seconds):
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record header, and nothing after it
        socks.append(s)
    time.sleep(seconds)
    closed = 0
    for s in socks:
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


def bigheader(host, port, authority, ca, cert, key):
    sock, raw = tls(host, port, ca, cert, key)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), ("x-big", "y" * 65536)])
    sock.sendall(conn.data_to_send())
    sock.settimeout(3)
    outcome = "no answer"
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                outcome = "closed"
                break
            for event in conn.receive_data(data):
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
        r = bigheader(host, port, a[0], a[1], a[2], a[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
