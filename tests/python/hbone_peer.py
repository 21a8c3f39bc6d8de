#!/usr/bin/env python3
"""An HBONE peer that shares no code with mesh: Python's ssl module and the `h2` package.

client: open mTLS + HTTP/2 to --connect, send one CONNECT with :authority --authority, and if
        the answer is 200 send --payload, half-close, read the echo to the end. Prints one JSON
        line {"status": ..., "echo_ok": ...} or {"error": ...} (exit 2).
server: listen on --listen with a certificate, require a client certificate from --ca, answer
        every CONNECT with 200 and echo the stream back (half-close passed on). Prints
        "listening" once bound, and one JSON line per request.
"""
import argparse
import json
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events


def tls_context(server, ca, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        # HBONE identifies peers by SPIFFE URI SAN, not host names: check the chain only.
        ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def client(args):
    host, port = parse_addr(args.connect)
    ctx = tls_context(False, args.ca, args.cert, args.key)
    try:
        raw = socket.create_connection((host, port), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname=None)
        if sock.selected_alpn_protocol() != "h2":
            raise RuntimeError("ALPN h2 not negotiated")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.authority)])
        sock.sendall(conn.data_to_send())
        status, echo, sent = None, b"", False
        payload = args.payload.encode()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                    if status == 200 and not sent:
                        conn.send_data(sid, payload, end_stream=True)
                        sent = True
                elif isinstance(event, h2.events.DataReceived):
                    echo += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    sock.sendall(conn.data_to_send())
                    print(json.dumps({"status": status, "echo_ok": echo == payload}))
                    return 0
            sock.sendall(conn.data_to_send())
        print(json.dumps({"status": status, "echo_ok": echo == payload}))
        return 0
    except (OSError, ssl.SSLError, RuntimeError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 2


def serve(sock, ctx):
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (OSError, ssl.SSLError) as e:
        print(json.dumps({"handshake_error": str(e)}), flush=True)
        return
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    while True:
        try:
            data = tls.recv(65536)
        except OSError:
            return
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                print(json.dumps({
                    "method": headers.get(b":method", b"").decode(),
                    "authority": headers.get(b":authority", b"").decode(),
                }), flush=True)
                conn.send_headers(event.stream_id, [(":status", "200")])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.data:
                    conn.send_data(event.stream_id, event.data)
            elif isinstance(event, h2.events.StreamEnded):
                conn.end_stream(event.stream_id)
        tls.sendall(conn.data_to_send())


def server(args):
    host, port = parse_addr(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ctx = tls_context(True, args.ca, args.cert, args.key)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    print("listening", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock, ctx), daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--payload", default="hello through hbone")
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    for p in (c, s):
        p.add_argument("--ca", required=True)
        p.add_argument("--cert")
        p.add_argument("--key")
    args = parser.parse_args()
    return client(args) if args.mode == "client" else server(args)


if __name__ == "__main__":
    sys.exit(main())
