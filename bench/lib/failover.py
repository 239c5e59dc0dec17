"""The measuring side of bench/failover.sh (see there)."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

KEEL, RUNS = sys.argv[1], int(sys.argv[2])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env):
    proc = subprocess.Popen([KEEL, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    return proc


def wait_line(proc, needle, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"keel exited before printing {needle!r}")
        if needle in line:
            return line.strip()
    raise SystemExit(f"keel did not print {needle!r}")


def keel(env, *args):
    out = subprocess.run([KEEL, *args], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"keel {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def containers(label):
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def get(router_port, host):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", router_port, timeout=2)
        conn.request("GET", "/", headers={"Host": host})
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def main():
    work = tempfile.mkdtemp(prefix="keel-failover-")
    env = dict(os.environ, KEEL_CONFIG=os.path.join(work, "config.toml"))
    env.pop("KEEL_URL", None)
    env.pop("KEEL_TOKEN", None)
    api, http_port = free_port(), free_port()
    tag = f"fo{os.getpid()}"
    node_a, node_b = f"{tag}a", f"{tag}b"
    up = start(["up", "--data-dir", os.path.join(work, "data"), "--listen", f"127.0.0.1:{api}",
                "--http", f"127.0.0.1:{http_port}", "--https", "off", "--name", node_a], env)
    procs = [up]
    try:
        wait_line(up, "CLI context")
        join_file = os.path.join(work, "data", "join.token")
        serving, full = [], []
        for run in range(RUNS):
            agent = start(["agent", "--controller", f"http://127.0.0.1:{api}", "--join-token-file", join_file,
                           "--name", node_b, "--zone", "b", "--advertise-addr", "127.0.0.2",
                           "--roles", "worker"], env)
            procs.append(agent)
            deadline = time.time() + 60
            while True:
                nodes = json.loads(keel(env, "nodes", "-o", "json"))
                if any(n["name"] == node_b and n["status"] == "ready" for n in nodes):
                    break
                if time.time() > deadline:
                    raise SystemExit("node b did not join")
                time.sleep(0.2)
            app, host = f"app{run}", f"run{run}.{tag}.test"
            manifest = os.path.join(work, f"{app}.yaml")
            with open(manifest, "w") as f:
                f.write(f"name: {app}\nproject: {tag}\nimage: keel-testserver:dev\ninstances: 4\n"
                        f"resources:\n  cpu_millis: 50\n  memory_mb: 32\n"
                        f"ports:\n  - name: http\n    port: 8080\nroutes:\n  - host: {host}\n"
                        f"health:\n  http:\n    path: /healthz\n  interval: 1s\n  timeout: 500ms\n")
            keel(env, "deploy", "-f", manifest)
            on_b = containers(f"keel.node={node_b}")
            if not on_b:
                raise SystemExit("the app was not spread over both nodes")
            failures = []
            stop = threading.Event()

            def load():
                while not stop.is_set():
                    if not get(http_port, host):
                        failures.append(time.time())
                    time.sleep(0.01)

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(1)
            lost = time.time()
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            subprocess.run(["docker", "rm", "-f", *on_b], capture_output=True)
            deadline = time.time() + 120
            while True:
                instances = json.loads(keel(env, "ps", app, "-o", "json"))
                ready = [i for i in instances if i["ready"] and i["node"] == node_a]
                if len(ready) == 4 and len(instances) == 4:
                    break
                if time.time() > deadline:
                    raise SystemExit("instances did not come back on node a")
                time.sleep(0.1)
            restored = time.time() - lost
            time.sleep(2)
            stop.set()
            loader.join()
            after = [t for t in failures if t >= lost]
            to_serving = (max(after) - lost) if after else 0.0
            serving.append(to_serving)
            full.append(restored)
            print(f"run {run + 1}: {len(after)} failed requests; serving again after {to_serving:.2f} s; "
                  f"4 ready on node a after {restored:.2f} s", flush=True)
            keel(env, "rm", app)
        print(f"node loss to every request succeeding: p50 {statistics.median(serving):.2f} s, "
              f"max {max(serving):.2f} s; to full capacity: p50 {statistics.median(full):.2f} s")
        print(f"RESULT failover node_loss_to_serving_p50_s={statistics.median(serving):.2f} "
              f"max_s={max(serving):.2f} full_capacity_p50_s={statistics.median(full):.2f}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        leftover = containers(f"keel.project={tag}")
        if leftover:
            subprocess.run(["docker", "rm", "-f", *leftover], capture_output=True)
        networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"label=keel.project={tag}"],
                                  capture_output=True, text=True).stdout.split()
        if networks:
            subprocess.run(["docker", "network", "rm", *networks], capture_output=True)


main()
