"""A minimal websocket client (RFC 6455, text frames in, nothing out but pongs and a close), standard library only:
enough to follow ComfyUI's /ws progress events."""
import base64
import json
import os
import socket
import struct
import urllib.parse


class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    def __init__(self, url: str, timeout: float = 30):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        header = b""
        while b"\r\n\r\n" not in header:
            chunk = self.sock.recv(1024)
            if not chunk:
                raise WebSocketClosed("the server closed the connection during the websocket handshake")
            header += chunk
        head, _, self._buffer = header.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head.splitlines()[0].decode(errors='replace')}")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WebSocketClosed("the server closed the websocket")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames only: payload < 126 bytes
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self):
        """The next text message (str) or binary message (bytes); answers pings on the way."""
        message, first_opcode = b"", None
        while True:
            b0, b1 = self._read(2)
            opcode, final = b0 & 0x0F, b0 & 0x80
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise WebSocketClosed("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            first_opcode = first_opcode or opcode
            message += payload
            if final:
                return message.decode("utf-8") if first_opcode == 0x1 else message

    def events(self):
        """ComfyUI's JSON events ({"type": ..., "data": ...}); binary preview frames are skipped."""
        while True:
            message = self.receive()
            if isinstance(message, str):
                yield json.loads(message)

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()
