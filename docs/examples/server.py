# server.py -- run with: python server.py runs/sst2-pcee [PORT]
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pcee.runtime import EarlyExitRuntime, InputError, PolicyError

runtime = EarlyExitRuntime.from_bundle(sys.argv[1])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            if self.path == "/operating-point":          # e.g. {"policy": "pcee", "tau": 0.2, "patience": 2}
                reply = runtime.set_operating_point(body).to_dict()
            else:                                        # {"texts": [...], "text_pairs": [...]?}
                result = runtime.predict(body["texts"], body.get("text_pairs"))
                reply = {"predictions": [row.to_dict() for row in result.predictions], **result.summary()}
            status = 200
        except (InputError, PolicyError, KeyError) as error:
            reply, status = {"error": str(error)}, 400
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


port = int(sys.argv[2]) if len(sys.argv) > 2 else 8080
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
