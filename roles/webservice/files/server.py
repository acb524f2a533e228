#!/usr/bin/python3
"""A stateless HTTP service: /healthz answers ok, / names the image version and the host.

An image baked with `maintenance` on serves its pages but reports itself unhealthy (503 on
/healthz), so that load balancers and rollouts keep traffic away from it.

Everything it says comes from files baked into the image, so any instance can be thrown away
and replaced by another of the same version without anyone noticing.
"""

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

IMAGE_RECORD = "/etc/pipeline-image.json"


def load(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class Handler(BaseHTTPRequestHandler):
    config: ClassVar[dict] = {}
    image: ClassVar[dict] = {}

    def do_GET(self):
        if self.path == "/healthz":
            if self.config.get("maintenance"):
                self.reply(503, "text/plain", "maintenance\n")
            else:
                self.reply(200, "text/plain", "ok\n")
        elif self.path == "/version":
            self.reply(200, "application/json", json.dumps(self.image) + "\n")
        elif self.path == "/":
            body = (
                f"{self.config['message']}\n"
                f"image: {self.image.get('image')} {self.image.get('version')}\n"
                f"build: {self.image.get('build_id')}\n"
                f"host: {socket.gethostname()}\n"
            )
            self.reply(200, "text/plain", body)
        else:
            self.reply(404, "text/plain", "not found\n")

    def reply(self, status, content_type, body):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type + "; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main():
    Handler.config = load(sys.argv[1])
    Handler.image = load(IMAGE_RECORD)
    server = ThreadingHTTPServer(("0.0.0.0", Handler.config["port"]), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
