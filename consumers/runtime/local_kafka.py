"""A local single-node Apache Kafka 4.x broker (KRaft, no ZooKeeper) for development, tests and the demo.

``crossdistil kafka up|down|status`` (``consumers.tools.kafka``) drives it from the command line;
:class:`LocalKafka` from Python (``ensure_topics`` is ``streamer.topics.ensure_topics``)::

    broker = LocalKafka(port=9092)
    broker.start(timeout_s=60)          # formats storage on first start, waits until metadata answers
    ensure_topics(broker.bootstrap)     # impressions, feedback, dead-letters, model-updates (compacted)
    ...
    broker.stop()

Everything a broker owns lives in one data directory:

* ``local-kafka.json`` - the ports and the cluster id chosen on first start (kept across restarts),
* ``server.properties`` - rewritten on every start from ``local-kafka.json``,
* ``kraft/`` - the broker's log segments and metadata log (``log.dirs``),
* ``broker.log`` - the broker's own log (log4j2, see ``deploy/kafka/log4j2.yaml``),
* ``broker.out`` - the JVM's stdout/stderr (crashes before log4j starts land here),
* ``broker.pid`` - the pid of the running broker,
* ``tmp/`` - the JVM's temporary files (``java.io.tmpdir``, Java's default /tmp ignores ``TMPDIR``): lz4-java
  unpacks its native library there, and a broker that is killed rather than stopped leaves it behind.

The jars come from ``deploy/kafka/fetch.sh`` (a cache under ``~/.cache/crossdistil``), or from the directory
named by ``CROSSDISTIL_KAFKA_LIBS``. Java 17 or newer must be on the PATH.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
FETCH_SCRIPT = DEPLOY_DIR / "fetch.sh"
LOG4J_CONFIG = DEPLOY_DIR / "log4j2.yaml"
LIBS_ENV = "CROSSDISTIL_KAFKA_LIBS"

DEFAULT_PORT = 9092

_STATE_FILE = "local-kafka.json"
_PID_FILE = "broker.pid"
_LOG_FILE = "broker.log"
_OUT_FILE = "broker.out"
_PROPERTIES_FILE = "server.properties"
_STORAGE_DIR = "kraft"
_JVM_TMP_DIR = "tmp"
_TLS_DIR = "tls"


class LocalKafkaError(RuntimeError):
    """The local broker could not be set up, started or stopped; the message says why and what to do."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/crossdistil/kafka``, i.e. ``~/.local/share/crossdistil/kafka`` by default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "crossdistil" / "kafka"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind ``host:port`` now: nothing listens there and no connection uses it as its
    local port (a port next to one the OS handed out may be a client's ephemeral port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def find_libs() -> Path:
    """The directory of the Kafka jars: ``$CROSSDISTIL_KAFKA_LIBS``, else whatever ``fetch.sh`` resolves."""
    override = os.environ.get(LIBS_ENV)
    if override:
        libs = Path(override).expanduser()
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise LocalKafkaError(f"{LIBS_ENV}={override} holds no kafka_2.13-*.jar; "
                                  "point it at a Kafka libs directory")
        return libs
    if shutil.which("bash") is None:
        raise LocalKafkaError(f"bash is needed to run {FETCH_SCRIPT}; or set {LIBS_ENV} to a Kafka libs directory")
    # fetch.sh prints the libs dir on stdout; its progress and errors go to stderr, which the user sees.
    result = subprocess.run(["bash", str(FETCH_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise LocalKafkaError(
            f"{FETCH_SCRIPT} failed (exit {result.returncode}); see its message above, "
            f"or set {LIBS_ENV} to a directory of Kafka jars"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def jdk_tool(name: str = "java") -> str:
    """A JDK program (``java``, ``keytool``): ``$JAVA_HOME/bin/<name>`` if set, else the one on the PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / name).exists():
        return str(Path(java_home) / "bin" / name)
    found = shutil.which(name)
    if found is None:
        raise LocalKafkaError(f"{name} not found: the local Kafka broker needs Java 17 or newer on the PATH "
                              "(e.g. 'apt-get install openjdk-17-jre-headless')")
    return found


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID as 22 characters of unpadded URL-safe base64, like
    ``kafka-storage random-uuid``."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file, or a note that it is missing."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _text_end(path: Path, size: int = 1 << 20) -> str:
    """The last ``size`` bytes of a text file ("" when it is missing): a startup error sits above the JVM's dump of
    its whole configuration, further back than ``tail`` looks."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class KafkaStatus:
    """What ``status()`` reports about a local broker."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: str
    log_file: str

    def describe(self) -> str:
        """One line for humans."""
        if self.running:
            return (f"Kafka is running (pid {self.pid}) at {self.bootstrap}; data in {self.data_dir}, "
                    f"log {self.log_file}")
        return f"Kafka is not running (data dir {self.data_dir}); start it with 'crossdistil kafka up'"


class LocalKafka:
    """A single-node KRaft broker (broker and controller in one JVM) bound to 127.0.0.1.

    ``port`` is the client port; ``None`` means the port this data dir used last, else 9092.
    ``controller_port`` likewise; when neither is known, ``port + 1`` if free, else any free port.
    The chosen ports and the cluster id are stored in the data dir, so a restart finds the same broker.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        controller_port: int | None = None,
        heap: str = "1g",
        sasl_ssl_port: int | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
        state = self._read_state()
        self.port = int(port if port is not None else state.get("port", DEFAULT_PORT))
        self._controller_port = controller_port if controller_port is not None else state.get("controller_port")
        self._controller_port_chosen = controller_port is None  # ours to change when it turns out taken
        self.heap = heap
        # A second listener with TLS and SASL (PLAIN, SCRAM-SHA-256 and -512; users: name -> password); the plaintext
        # one stays for the broker itself. The certificates are made once per data dir (make_tls_material).
        self.sasl_ssl_port = sasl_ssl_port
        self.users = dict(users or {})
        if sasl_ssl_port is not None and not self.users:
            raise LocalKafkaError("a SASL_SSL listener needs at least one user (name and password)")
        self._process: subprocess.Popen[bytes] | None = None

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string for clients, ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        """The bootstrap servers string of the SASL_SSL listener, ``127.0.0.1:PORT``."""
        if self.sasl_ssl_port is None:
            raise LocalKafkaError("this broker has no SASL_SSL listener (start it with sasl_ssl_port)")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def ca_file(self) -> Path:
        """The PEM certificate of the CA that signed the broker's TLS certificate (for ``ssl_cafile``)."""
        return self.data_dir / _TLS_DIR / "ca.pem"

    @property
    def log_file(self) -> Path:
        """The broker's log file (log4j2)."""
        return self.data_dir / _LOG_FILE

    @property
    def pid_file(self) -> Path:
        """The file holding the running broker's pid."""
        return self.data_dir / _PID_FILE

    # -- lifecycle -------------------------------------------------------------------------------------------
    def status(self) -> KafkaStatus:
        """Whether this data dir's broker is running, with its pid, bootstrap, data dir and log file."""
        pid = self._running_pid()
        return KafkaStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            data_dir=str(self.data_dir),
            log_file=str(self.log_file),
        )

    def start(self, timeout_s: float = 60.0, preexec_fn: Callable[[], None] | None = None,
              retry_port: bool = True) -> bool:
        """Start the broker in the background and wait until it answers a metadata request.

        Returns True if a broker was started, False if this data dir's broker was already running.
        ``preexec_fn`` runs in the broker's process before exec (the demo uses it to tie the broker's life to
        its own with Linux's parent-death signal).
        A controller port this object chose that another process takes before the JVM binds it is replaced once
        (``retry_port``). Raises LocalKafkaError, naming the log file and quoting its last lines, if the broker
        exits early or does not answer within ``timeout_s`` (in which case it is stopped again).
        """
        if self._running_pid() is not None:
            return False
        if port_in_use(self.port):
            raise LocalKafkaError(
                f"something else already listens on 127.0.0.1:{self.port} (another Kafka?); "
                f"stop it or choose another port with --port"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        java = jdk_tool("java")
        libs = find_libs()
        state = self._prepare_state()
        if self.sasl_ssl_port is not None:
            if port_in_use(self.sasl_ssl_port):
                raise LocalKafkaError(f"something else already listens on 127.0.0.1:{self.sasl_ssl_port}")
            state = self._prepare_tls(state)
        properties = self._write_properties(state)
        classpath = str(libs / "*")
        jvm_tmp = self.data_dir / _JVM_TMP_DIR
        jvm_tmp.mkdir(exist_ok=True)
        jvm_options = [f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={self.data_dir}",
                       f"-Djava.io.tmpdir={jvm_tmp}"]
        if not (self.data_dir / _STORAGE_DIR / "meta.properties").exists():
            self._format_storage(java, jvm_options, classpath, state["cluster_id"], properties)

        command = [
            java, f"-Xmx{self.heap}", f"-Xms{min_heap(self.heap)}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            *jvm_options, "-cp", classpath, "kafka.Kafka", str(properties),
        ]
        out = (self.data_dir / _OUT_FILE).open("ab")
        try:
            # A new session detaches the broker from the terminal: Ctrl-C in the shell that ran 'kafka up'
            # must not kill it, and 'kafka down' signals it explicitly.
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True, close_fds=True, preexec_fn=preexec_fn,
            )
        finally:
            out.close()
        self.pid_file.write_text(f"{self._process.pid}\n")
        try:
            self._wait_until_ready(timeout_s)
        except LocalKafkaError as exc:
            self.stop()
            logs = str(exc) + _text_end(self.log_file) + _text_end(self.data_dir / _OUT_FILE)
            taken = "Address already in use" in logs
            if retry_port and taken and self._controller_port_chosen:
                # Another process took the controller's port between our check and the JVM's bind: once more,
                # on a port the OS hands out now.
                self._controller_port = free_port()
                return self.start(timeout_s, preexec_fn, retry_port=False)
            raise
        except BaseException:
            self.stop()
            raise
        return True

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker: SIGTERM (a clean shutdown), SIGKILL if it is still alive after ``timeout_s``.

        Returns True if a broker was running. Removes the pid file either way.
        """
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        self._signal(pid, signal.SIGTERM)
        if not self._wait_for_exit(pid, timeout_s):
            self._signal(pid, signal.SIGKILL)
            if not self._wait_for_exit(pid, 10.0):
                raise LocalKafkaError(f"Kafka (pid {pid}) survived SIGKILL; see {self.log_file}")
        self.pid_file.unlink(missing_ok=True)
        self._process = None
        return True

    # -- internals -------------------------------------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        path = self.data_dir / _STATE_FILE
        if not path.exists():
            return {}
        try:
            return dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise LocalKafkaError(f"{path} is not valid JSON ({exc}); "
                                  f"delete the data dir {self.data_dir} to start afresh") from exc

    def _prepare_state(self) -> dict[str, Any]:
        state = self._read_state()
        controller_port = self._controller_port
        if controller_port is None or not port_bindable(int(controller_port)):
            controller_port = self.port + 1 if port_bindable(self.port + 1) else free_port()
        state.update(port=self.port, controller_port=int(controller_port))
        state.setdefault("cluster_id", new_cluster_id())
        self._controller_port = int(controller_port)
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        return state

    def _write_properties(self, state: Mapping[str, Any]) -> Path:
        # lazy: streamer.topics loads kafka-python, which 'crossdistil kafka --help' does not need
        from streamer.topics import DEFAULT_PARTITIONS, MODEL_MAX_MESSAGE_BYTES

        port, cport = state["port"], state["controller_port"]
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / _STORAGE_DIR),
            # One node: every internal topic must make do with one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "num.partitions": str(DEFAULT_PARTITIONS),
            # Consumers joining a group should not wait 3 s for company that never comes.
            "group.initial.rebalance.delay.ms": "0",
            # The broker-wide ceiling must admit the model topic's messages (checkpoint chunks) too.
            "message.max.bytes": str(MODEL_MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MODEL_MAX_MESSAGE_BYTES),
            "auto.create.topics.enable": "true",
        }
        if self.sasl_ssl_port is not None:
            settings.update(self._sasl_ssl_settings(state))
        path = self.data_dir / _PROPERTIES_FILE
        body = "".join(f"{key}={value}\n" for key, value in settings.items())
        path.write_text("# Written by consumers/runtime/local_kafka.py on every start; edits are overwritten.\n" + body)
        return path

    def _prepare_tls(self, state: dict[str, Any]) -> dict[str, Any]:
        """The broker's keystore and the CA certificate, made once per data dir (their password in the state)."""
        state.setdefault("tls_password", uuid.uuid4().hex)
        if not (self.data_dir / _TLS_DIR / "broker.p12").exists() or not self.ca_file.exists():
            make_tls_material(self.data_dir / _TLS_DIR, state["tls_password"])
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        return state

    def _sasl_ssl_settings(self, state: Mapping[str, Any]) -> dict[str, str]:
        """The SASL_SSL listener: TLS with the data dir's keystore, SASL/PLAIN and SCRAM-SHA-256/512 with ``users``."""
        port, sport, cport = state["port"], self.sasl_ssl_port, state["controller_port"]
        users = " ".join(f'user_{name}="{password}"' for name, password in self.users.items())
        return {
            "listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sport},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sport}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_ssl.plain.sasl.jaas.config":
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
            # SCRAM's credentials are in the cluster's metadata, written when the storage is formatted
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.data_dir / _TLS_DIR / "broker.p12"),
            "ssl.keystore.password": state["tls_password"],
            "ssl.key.password": state["tls_password"],
            "ssl.client.auth": "none",
        }

    def _format_storage(self, java: str, jvm_options: list[str], classpath: str, cluster_id: str,
                        properties: Path) -> None:
        # No --standalone: controller.quorum.voters already names the (static) quorum.
        command = [java, *jvm_options, "-cp", classpath, "kafka.tools.StorageTool", "format",
                   f"--cluster-id={cluster_id}", "-c", str(properties)]  # "=": an id may start with "-"
        # The SASL_SSL listener's users for SCRAM-SHA-256 and -512: their credentials live in the cluster's metadata,
        # written here once (PLAIN's come from each start's properties, so a later password change reaches PLAIN only).
        if self.sasl_ssl_port is not None:
            for name, password in self.users.items():
                for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    command += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LocalKafkaError(
                f"formatting Kafka storage in {self.data_dir / _STORAGE_DIR} failed (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()[-3000:]}"
            )

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        from kafka.errors import KafkaConfigurationError, KafkaError

        last_error = "no answer yet"
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                self.pid_file.unlink(missing_ok=True)
                # The JVM's own output first: it holds the reason when the JVM died before log4j started.
                raise LocalKafkaError(
                    f"Kafka exited during startup with status {code}. "
                    f"Last lines of {self.data_dir / _OUT_FILE}:\n{tail(self.data_dir / _OUT_FILE, 10)}\n"
                    f"Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalKafkaError(
                    f"Kafka did not answer a metadata request at {self.bootstrap} within {timeout_s:.0f} s "
                    f"(last error: {last_error}). Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            if port_in_use(self.port):
                try:
                    if broker_ids(self.bootstrap, timeout_s=min(5.0, max(1.0, remaining))):
                        return
                    last_error = "the cluster lists no unfenced broker yet"
                except KafkaConfigurationError:
                    raise  # our bug, not a booting broker: retrying would only hide it
                except (KafkaError, OSError) as exc:  # kafka-python raises several types while a broker boots
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if self._process is not None and self._process.pid == pid:
            return pid if self._process.poll() is None else None
        return pid if _is_live_kafka(pid) else None

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_for_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                try:
                    self._process.wait(timeout=0.2)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not _is_live_kafka(pid):
                return True
            time.sleep(0.2)
        return False


def make_tls_material(directory: Path, password: str) -> None:
    """A private CA (``ca.p12``, its certificate ``ca.pem``) and the broker's keystore ``broker.p12``: a key and a
    certificate for 127.0.0.1 and localhost signed by that CA, with the CA's certificate as its chain. Clients
    trust ``ca.pem`` (``ssl_cafile``) and check the host name against the certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    keytool = jdk_tool("keytool")
    ca, broker = str(directory / "ca.p12"), str(directory / "broker.p12")
    for path in (ca, broker):
        Path(path).unlink(missing_ok=True)
    common = ["-storetype", "PKCS12", "-storepass", password, "-keypass", password]
    san = "SAN=IP:127.0.0.1,DNS:localhost"
    steps = [
        ["-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048", "-validity", "3650",
         "-dname", "CN=crossdistil local CA", "-ext", "bc:c", "-keystore", ca, *common],
        ["-exportcert", "-rfc", "-alias", "ca", "-keystore", ca, "-storepass", password,
         "-file", str(directory / "ca.pem")],
        ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "3650",
         "-dname", "CN=127.0.0.1", "-ext", san, "-keystore", broker, *common],
        ["-certreq", "-alias", "broker", "-keystore", broker, "-storepass", password,
         "-file", str(directory / "broker.csr")],
        ["-gencert", "-rfc", "-alias", "ca", "-keystore", ca, "-storepass", password, "-validity", "3650",
         "-ext", san, "-infile", str(directory / "broker.csr"), "-outfile", str(directory / "broker.pem")],
        ["-importcert", "-noprompt", "-alias", "ca", "-file", str(directory / "ca.pem"), "-keystore", broker,
         "-storepass", password],
        ["-importcert", "-noprompt", "-alias", "broker", "-file", str(directory / "broker.pem"), "-keystore", broker,
         "-storepass", password],
    ]
    for args in steps:
        result = subprocess.run([keytool, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LocalKafkaError(f"keytool {args[0]} failed (exit {result.returncode}): "
                                  f"{(result.stdout + result.stderr).strip()[-2000:]}")


def min_heap(heap: str) -> str:
    """The initial heap: 256m, or the maximum if that is smaller (Java refuses -Xms above -Xmx)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    value = heap.strip().lower()
    size = int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)
    return heap if size < 256 << 20 else "256m"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone). Uses /proc where there is one."""
    stat = Path("/proc") / str(pid) / "stat"
    if Path("/proc/self").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_live_kafka(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) Kafka JVM; guards against a stale pid file naming a reused pid."""
    if not Path("/proc/self").exists():
        # No /proc: on Linux that is a broken mount, so do not trust the pid file; elsewhere (macOS) trust it
        # if the process exists.
        return not sys.platform.startswith("linux") and pid_alive(pid)
    if not pid_alive(pid):
        return False
    try:
        return b"kafka.Kafka" in (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False


def broker_ids(bootstrap: str, timeout_s: float = 5.0) -> list[int]:
    """The ids of the unfenced brokers that ``bootstrap`` reports (DescribeCluster); empty while still fenced."""
    from kafka import KafkaAdminClient

    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="crossdistil-local-kafka",
        request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms,
    )
    try:
        brokers = admin.describe_cluster()["brokers"]
        return sorted(int(b["broker_id"]) for b in brokers if not b.get("is_fenced", False))
    finally:
        admin.close()
