#!/usr/bin/env python3
"""Starts a real TensorBoard server on LOGDIR and asks its HParams plugin, over HTTP as the
dashboard does, for the session groups: one per run, with its settings, its status and its
`hparams/*` metrics.

Usage: check_hparams.py LOGDIR
Needs: pip install tensorboard (scripts/test.sh sets up .venv with it).
Prints a JSON list [{run, hparams, status, metrics}] sorted by run; exits 1 when the server does
not answer within a minute or lists no session."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/hparams/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def main() -> int:
    logdir = sys.argv[1]
    port = free_port()
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    server = subprocess.Popen(
        [tensorboard, "--logdir", logdir, "--port", str(port), "--host", "127.0.0.1", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        statuses = ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING", "STATUS_UNKNOWN"]
        query = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 1000}
        deadline = time.time() + 60
        groups = []
        while time.time() < deadline:
            try:
                groups = post(port, "session_groups", query).get("sessionGroups", [])
                if groups:
                    break
            except OSError:
                pass
            time.sleep(1)
        if not groups:
            print(json.dumps({"problem": f"no HParams sessions from TensorBoard on {logdir} within 60 s"}))
            return 1
        sessions = []
        for g in groups:
            for s in g["sessions"]:
                sessions.append(
                    {
                        "run": s["name"],
                        "hparams": g["hparams"],
                        "status": s.get("status"),
                        "metrics": {
                            m["name"]["tag"]: m["value"]
                            for m in s["metricValues"]
                            if m["name"]["tag"].startswith("hparams/")
                        },
                    }
                )
        print(json.dumps(sorted(sessions, key=lambda s: s["run"])))
        return 0
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
