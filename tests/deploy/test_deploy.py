"""Static checks of the deployment files: Dockerfile, compose demo, Kubernetes manifests, docs.

Run from the repository root:  python3 -m unittest discover -s tests/deploy -v
Needs PyYAML (pip install pyyaml) and Python >= 3.11 (tomllib). Without them the tests fail with a
message saying so; nothing here is ever skipped.
"""

import json
import re
import shutil
import subprocess
import unittest
from pathlib import Path

try:
    import yaml
except ImportError:  # reported by every test that needs it, and by test_pyyaml_is_installed
    yaml = None

try:
    import tomllib
except ImportError:
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S_DIR = DEPLOY / "kubernetes"

CONTAINER_CONFIG = "/etc/vestibule/config.toml"
BINARY = "/usr/local/bin/vestibule"
ADMIN_PORT = 9091


def need_yaml(test):
    if yaml is None:
        test.fail("PyYAML is not installed: run `pip install pyyaml` (these tests never skip)")


def need_toml(test):
    if tomllib is None:
        test.fail("tomllib is missing: these tests need Python >= 3.11")


def load_toml(test, path):
    need_toml(test)
    with open(path, "rb") as f:
        return tomllib.load(f)


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(text):
    """(instruction, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages(instructions):
    """List of stages: {"name", "from", "body": [(instr, args)]}."""
    stages = []
    for instr, args in instructions:
        if instr == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "from": parts[0], "body": []})
        elif stages:
            stages[-1]["body"].append((instr, args))
    return stages


def exec_form(args):
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = (ROOT / "Dockerfile").read_text()
        cls.instructions = dockerfile_instructions(cls.text)
        cls.stages = dockerfile_stages(cls.instructions)
        cls.final = cls.stages[-1]

    def body(self, stage, instr):
        return [args for i, args in stage["body"] if i == instr]

    def test_is_multi_stage_with_a_named_build_stage(self):
        self.assertGreaterEqual(len(self.stages), 2, "expected a build stage and a runtime stage")
        self.assertTrue(any(s["name"] == "build" for s in self.stages))

    def test_build_stage_compiles_the_locked_release_binary_with_cache_mounts(self):
        build = next(s for s in self.stages if s["name"] == "build")
        runs = " ".join(self.body(build, "RUN"))
        self.assertIn("cargo build --release --locked", runs)
        self.assertRegex(runs, r"--mount=type=cache,[^ ]*target=/usr/local/cargo/registry")
        cache_targets = re.findall(r"--mount=type=cache,[^ ]*target=([^ ,]+)", runs)
        workdir = self.body(build, "WORKDIR")[-1]
        self.assertIn(f"{workdir.rstrip('/')}/target", cache_targets, "the target dir is cached")
        # A cache mount is not in the image: the binaries must be copied out of it.
        self.assertRegex(runs, r"cp [^;&]*target/release/vestibule")

    def test_build_stage_ships_the_profile_guided_build_by_default(self):
        # The binary docs/benchmarks.md measures: scripts/build-pgo, unless PGO=0 is passed.
        build = next(s for s in self.stages if s["name"] == "build")
        runs = " ".join(self.body(build, "RUN"))
        self.assertRegex(runs, r'cp "\$\(scripts/build-pgo --print-path\)" /out/vestibule')
        args = [a for i, a in self.instructions if i == "ARG"]
        self.assertIn("PGO=1", args)
        self.assertIn("PGO", self.body(build, "ARG"), "the build stage must see the PGO argument")

    def test_build_stage_also_builds_the_sample_api(self):
        build = next(s for s in self.stages if s["name"] == "build")
        runs = " ".join(self.body(build, "RUN"))
        self.assertIn("--example sample_api", runs)
        sample = [s for s in self.stages if s["name"] == "sample-api"]
        self.assertEqual(len(sample), 1, "a stage named sample-api for the compose demo")
        self.assertTrue(any("--from=build" in c for c in self.body(sample[0], "COPY")))
        self.assertTrue(self.body(sample[0], "ENTRYPOINT"))

    def test_builder_and_runtime_share_the_debian_release(self):
        # A binary linked against a newer glibc than the runtime's would not start.
        build = next(s for s in self.stages if s["name"] == "build")
        self.assertIn("bookworm", build["from"])
        self.assertRegex(self.final["from"], r"debian12|bookworm")

    def test_runtime_is_minimal_and_copies_the_binary_from_the_build(self):
        self.assertRegex(self.final["from"], r"^(gcr\.io/distroless/cc-debian12|debian:bookworm-slim)")
        copies = self.body(self.final, "COPY")
        self.assertTrue(any("--from=build" in c and c.rstrip().endswith(BINARY) for c in copies))

    def test_every_runtime_stage_runs_as_a_non_root_user(self):
        for stage in self.stages[1:]:
            users = self.body(stage, "USER")
            self.assertTrue(users, f"stage {stage['name']} sets no USER")
            user = users[-1].split(":")[0]
            self.assertNotIn(user, ("root", "0"), f"stage {stage['name']} runs as root")

    def test_final_user_is_numeric_so_kubernetes_can_verify_run_as_non_root(self):
        self.assertRegex(self.body(self.final, "USER")[-1], r"^[1-9][0-9]*(:[0-9]+)?$")

    def test_exposes_the_public_and_admin_ports(self):
        ports = " ".join(self.body(self.final, "EXPOSE")).split()
        self.assertIn("8080", ports)
        self.assertIn(str(ADMIN_PORT), ports)

    def test_reads_the_config_from_etc_vestibule(self):
        envs = " ".join(self.body(self.final, "ENV"))
        self.assertIn(f"VESTIBULE_CONFIG={CONTAINER_CONFIG}", envs)
        cmd = exec_form(self.body(self.final, "CMD")[-1])
        self.assertEqual(cmd, ["--config", CONTAINER_CONFIG])
        self.assertEqual(exec_form(self.body(self.final, "ENTRYPOINT")[-1]), [BINARY])

    def test_healthcheck_is_exec_form_calling_vestibule_health(self):
        checks = self.body(self.final, "HEALTHCHECK")
        self.assertEqual(len(checks), 1)
        match = re.search(r"(?:^|\s)CMD\s+(\[.*\])\s*$", checks[0])
        self.assertIsNotNone(match, "HEALTHCHECK must use CMD [\"...\"] (exec form, no shell)")
        argv = exec_form(match.group(1))
        self.assertIsNotNone(argv, "HEALTHCHECK CMD is not a JSON array of strings")
        self.assertEqual(argv[:2], [BINARY, "health"])
        if "--url" in argv:
            url = argv[argv.index("--url") + 1]
            self.assertEqual(url, f"http://127.0.0.1:{ADMIN_PORT}/healthz")

    def test_dockerignore_keeps_the_context_small(self):
        lines = {
            line.strip().rstrip("/")
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        for needed in ("target", ".git", "**/node_modules"):
            self.assertIn(needed, lines)
        for kept in ("src", "examples", "Cargo.toml", "Cargo.lock"):
            self.assertNotIn(kept, lines, f"{kept} is needed by cargo build")
        for kept in ("scripts", "tests", "tests/provider"):
            self.assertNotIn(kept, lines, f"{kept} is needed by the training run of scripts/build-pgo")


# --- YAML and JSON everywhere under deploy/ -----------------------------------------------------


class ParsesTest(unittest.TestCase):
    def test_pyyaml_is_installed(self):
        need_yaml(self)

    def test_every_yaml_file_under_deploy_parses(self):
        need_yaml(self)
        files = sorted(list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml")))
        self.assertGreater(len(files), 5)
        for path in files:
            with self.subTest(path=str(path.relative_to(ROOT))):
                docs = list(yaml.safe_load_all(path.read_text()))
                self.assertTrue(any(d is not None for d in docs))

    def test_every_json_file_under_deploy_parses(self):
        for path in DEPLOY.rglob("*.json"):
            with self.subTest(path=str(path.relative_to(ROOT))):
                json.loads(path.read_text())

    def test_every_config_toml_under_deploy_parses(self):
        files = list(DEPLOY.rglob("config.toml"))
        self.assertGreaterEqual(len(files), 2)
        for path in files:
            with self.subTest(path=str(path.relative_to(ROOT))):
                load_toml(self, path)


# --- Kubernetes ---------------------------------------------------------------------------------


class KubernetesTest(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        self.objects = {}
        for path in sorted(K8S_DIR.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and "kind" in doc and "apiVersion" in doc:
                    self.objects.setdefault(doc["kind"], []).append(doc)
        self.deployment = self.one("Deployment")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]

    def one(self, kind):
        found = self.objects.get(kind, [])
        self.assertEqual(len(found), 1, f"expected exactly one {kind}")
        return found[0]

    def port_number(self, port):
        if isinstance(port, int):
            return port
        for p in self.container["ports"]:
            if p["name"] == port:
                return p["containerPort"]
        self.fail(f"no container port named {port}")

    def test_deployment_runs_at_least_two_replicas(self):
        self.assertGreaterEqual(self.deployment["spec"]["replicas"], 2)

    def test_probes_use_the_admin_port(self):
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            with self.subTest(probe=probe):
                get = self.container[probe]["httpGet"]
                self.assertEqual(get["path"], path)
                self.assertEqual(self.port_number(get["port"]), ADMIN_PORT)

    def test_container_exposes_public_and_admin_ports(self):
        self.assertEqual({p["containerPort"] for p in self.container["ports"]}, {8080, ADMIN_PORT})

    def test_pod_and_container_security_context(self):
        pod_sc = self.pod["securityContext"]
        self.assertTrue(pod_sc["runAsNonRoot"])
        self.assertEqual(pod_sc["seccompProfile"]["type"], "RuntimeDefault")
        sc = self.container["securityContext"]
        self.assertTrue(sc["runAsNonRoot"])
        self.assertNotEqual(sc.get("runAsUser", pod_sc.get("runAsUser")), 0)
        self.assertTrue(sc["readOnlyRootFilesystem"])
        self.assertIs(sc["allowPrivilegeEscalation"], False)
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        self.assertNotIn("add", sc["capabilities"])
        self.assertEqual(sc["seccompProfile"]["type"], "RuntimeDefault")

    def test_resources_have_requests_and_limits(self):
        res = self.container["resources"]
        for kind in ("requests", "limits"):
            self.assertIn("cpu", res[kind])
            self.assertIn("memory", res[kind])

    def test_a_network_policy_keeps_the_admin_port_from_everyone_but_probes_and_monitoring(self):
        # The admin port serves /metrics, /readyz and /jwks: only the monitoring namespace (and
        # the kubelet, which CNIs let probe regardless) may reach it; the public port only from
        # the ingress controller's namespace. The policy is applied with the rest.
        policy = self.one("NetworkPolicy")
        kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
        self.assertIn("networkpolicy.yaml", kustomization["resources"])
        spec = policy["spec"]
        self.assertEqual(
            spec["podSelector"]["matchLabels"],
            self.deployment["spec"]["selector"]["matchLabels"],
        )
        self.assertIn("Ingress", spec["policyTypes"])
        allowed = {}
        for rule in spec["ingress"]:
            ports = [self.port_number(p["port"]) for p in rule.get("ports", [])]
            self.assertTrue(ports, f"a rule allows every port: {rule}")
            sources = rule.get("from")
            self.assertTrue(sources, f"a rule allows every source: {rule}")
            for source in sources:
                self.assertNotIn("ipBlock", source, "admit by namespace, not by address")
                self.assertTrue(
                    source.get("namespaceSelector", {}).get("matchLabels"),
                    f"a source is not limited to named namespaces: {source}",
                )
            for port in ports:
                allowed.setdefault(port, []).extend(sources)
        self.assertEqual(set(allowed), {8080, ADMIN_PORT})
        admin_namespaces = [s["namespaceSelector"]["matchLabels"] for s in allowed[ADMIN_PORT]]
        public_namespaces = [s["namespaceSelector"]["matchLabels"] for s in allowed[8080]]
        for labels in admin_namespaces:
            self.assertNotIn(labels, public_namespaces, "the ingress controller reaches the admin port")

    def test_pods_spread_over_nodes(self):
        keys = {c["topologyKey"] for c in self.pod["topologySpreadConstraints"]}
        self.assertIn("kubernetes.io/hostname", keys)
        labels = self.deployment["spec"]["selector"]["matchLabels"]
        for c in self.pod["topologySpreadConstraints"]:
            self.assertEqual(c["labelSelector"]["matchLabels"], labels)

    def config_volume_name(self):
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        mounts = {m["mountPath"]: m for m in self.container["volumeMounts"]}
        mount = mounts["/etc/vestibule"]
        self.assertTrue(mount["readOnly"])
        self.assertNotIn("subPath", mount, "a subPath mount never sees an updated ConfigMap")
        return volumes[mount["name"]]["configMap"]["name"]

    def test_configmap_is_generated_from_config_toml_not_pasted(self):
        kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
        generators = {g["name"]: g for g in kustomization.get("configMapGenerator", [])}
        name = self.config_volume_name()
        self.assertIn(name, generators, "the Deployment mounts the generated ConfigMap")
        self.assertEqual(generators[name].get("files"), ["config.toml"])
        self.assertTrue((K8S_DIR / "config.toml").is_file())
        # No copy to keep in step: no ConfigMap object in the manifests, no config.toml text in
        # any of them.
        self.assertNotIn("ConfigMap", self.objects)
        self.assertNotIn("configmap.yaml", kustomization["resources"])
        for path in K8S_DIR.glob("*.yaml"):
            with self.subTest(file=path.name):
                self.assertNotRegex(path.read_text(), r"(?m)^\s*\[server\]\s*$")
        env = {e["name"]: e for e in self.container["env"]}
        self.assertEqual(env["VESTIBULE_CONFIG"]["value"], CONTAINER_CONFIG)

    def test_kustomize_renders_config_toml_into_the_mounted_configmap(self):
        if shutil.which("kubectl"):
            command = ["kubectl", "kustomize", str(K8S_DIR)]
        elif shutil.which("kustomize"):
            command = ["kustomize", "build", str(K8S_DIR)]
        else:
            self.fail("neither kubectl nor kustomize is installed (scripts/test installs kustomize)")
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        objects = {}
        for doc in yaml.safe_load_all(out):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
        [cm] = objects["ConfigMap"]
        [deployment] = objects["Deployment"]
        self.assertEqual(cm["data"]["config.toml"], (K8S_DIR / "config.toml").read_text())
        self.assertEqual(cm["metadata"]["namespace"], "vestibule")
        # The generated name carries a hash of the contents: a change rolls the pods out.
        self.assertRegex(cm["metadata"]["name"], r"^vestibule-config-[a-z0-9]{10}$")
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        self.assertIn(cm["metadata"]["name"], [v.get("configMap", {}).get("name") for v in volumes])

    def test_config_is_fit_for_several_replicas_in_a_cluster(self):
        config = load_toml(self, K8S_DIR / "config.toml")
        self.assertEqual(config["admin"]["listen"], f"0.0.0.0:{ADMIN_PORT}")
        self.assertEqual(config["session"]["store"], "redis")
        self.assertTrue(config["session"]["cookie_secure"])
        self.assertTrue(config["session"]["cookie_name"].startswith("__Host-"))
        self.assertFalse(config["oidc"].get("allow_http_issuer", False))
        self.assertTrue(config["server"]["public_url"].startswith("https://"))

    def test_every_secret_reference_exists_in_the_secret_template(self):
        secret = self.one("Secret")
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        self.assertTrue({"client-secret", "session-key"} <= keys)
        for e in self.container["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                self.assertEqual(ref["name"], secret["metadata"]["name"])
                if not ref.get("optional"):
                    self.assertIn(ref["key"], keys)

    def test_every_env_var_the_config_needs_is_provided(self):
        needed = set(re.findall(r"\$\{([A-Z0-9_]+)\}", (K8S_DIR / "config.toml").read_text()))
        provided = {e["name"] for e in self.container["env"]}
        self.assertLessEqual(needed, provided)

    def test_secret_template_is_not_applied_by_kustomize(self):
        kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
        self.assertNotIn("secret.yaml", kustomization["resources"])
        for name in kustomization["resources"]:
            self.assertTrue((K8S_DIR / name).is_file(), name)

    def test_pdb_and_service_select_the_pods(self):
        labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        pdb = self.one("PodDisruptionBudget")
        svc = self.one("Service")
        for selector in (pdb["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]):
            self.assertTrue(selector.items() <= labels.items())
        self.assertTrue("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"])
        targets = {p["targetPort"] for p in svc["spec"]["ports"]}
        self.assertIn(8080, {self.port_number(t) for t in targets})

    def test_shutdown_fits_in_the_termination_grace_period(self):
        config = load_toml(self, K8S_DIR / "config.toml")
        grace = parse_seconds(config["server"]["shutdown_grace"])
        pre_stop = self.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        self.assertLess(grace + pre_stop.get("seconds", 0), self.pod["terminationGracePeriodSeconds"])


def parse_seconds(text):
    match = re.fullmatch(r"(\d+)(s|m|h)", text)
    assert match, text
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


# --- Compose ------------------------------------------------------------------------------------


class ComposeTest(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        self.compose = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
        self.services = self.compose["services"]
        self.config = load_toml(self, COMPOSE_DIR / "config.toml")
        self.realm = json.loads((COMPOSE_DIR / "realm-vestibule.json").read_text())
        self.vestibules = {
            name: svc
            for name, svc in self.services.items()
            if isinstance(svc.get("build"), dict) and svc["build"].get("target") == "runtime"
        }

    def env(self, service):
        env = self.services[service].get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        return {k: str(v) for k, v in env.items()}

    def namespace(self, service):
        return self.services[service].get("network_mode")

    def test_has_keycloak_redis_and_the_sample_api(self):
        for name in ("keycloak", "redis", "sample-api"):
            self.assertIn(name, self.services)
        self.assertIn("keycloak", self.services["keycloak"]["image"])
        self.assertIn("redis", self.services["redis"]["image"])
        self.assertEqual(self.services["sample-api"]["build"]["target"], "sample-api")

    def test_two_vestibule_replicas_share_one_redis(self):
        self.assertGreaterEqual(len(self.vestibules), 2)
        self.assertEqual(self.config["session"]["store"], "redis")
        self.assertEqual(self.config["session"]["redis"]["url"], "redis://127.0.0.1:6379")
        redis_cmd = self.services["redis"]["command"]
        self.assertEqual(redis_cmd[redis_cmd.index("--port") + 1], "6379")
        for name, svc in self.vestibules.items():
            with self.subTest(replica=name):
                # Same network namespace as Redis, so 127.0.0.1:6379 is that one Redis.
                self.assertEqual(self.namespace(name), self.namespace("redis"))
                self.assertIn("./config.toml:/etc/vestibule/config.toml:ro", svc["volumes"])
                self.assertEqual(svc["depends_on"]["redis"]["condition"], "service_healthy")
        keys = {self.env(name)["VESTIBULE_SESSION_KEY"] for name in self.vestibules}
        self.assertEqual(len(keys), 1, "replicas must share the session keys")

    def test_replicas_listen_on_distinct_ports_behind_the_load_balancer(self):
        nginx = (COMPOSE_DIR / "nginx.conf").read_text()
        ports, admin_ports = set(), set()
        for name, svc in self.vestibules.items():
            env = self.env(name)
            ports.add(env["VESTIBULE_PORT"])
            admin_ports.add(env["VESTIBULE_ADMIN_PORT"])
            self.assertIn(f"server 127.0.0.1:{env['VESTIBULE_PORT']}", nginx)
            check = svc["healthcheck"]["test"]
            self.assertEqual(check[:3], ["CMD", BINARY, "health"])
            self.assertEqual(
                check[check.index("--url") + 1],
                f"http://127.0.0.1:{env['VESTIBULE_ADMIN_PORT']}/healthz",
            )
        self.assertEqual(len(ports), len(self.vestibules))
        self.assertEqual(len(admin_ports), len(self.vestibules))
        self.assertEqual(self.config["server"]["listen"], "127.0.0.1:${VESTIBULE_PORT}")
        self.assertEqual(self.config["admin"]["listen"], "127.0.0.1:${VESTIBULE_ADMIN_PORT}")
        self.assertIn("listen 8080;", nginx)
        self.assertIn("127.0.0.1:8080:8080", self.services["netns"]["ports"])

    def test_every_service_shares_the_pod_like_namespace(self):
        for name, svc in self.services.items():
            if name != "netns":
                self.assertEqual(svc.get("network_mode"), "service:netns", name)
                self.assertNotIn("ports", svc, f"{name}: publish ports on netns only")

    def test_issuer_is_the_same_loopback_url_everywhere(self):
        issuer = self.config["oidc"]["issuer"]
        self.assertTrue(issuer.startswith("http://127.0.0.1:"), "allow_http_issuer is for loopback")
        self.assertTrue(self.config["oidc"]["allow_http_issuer"])
        kc = self.env("keycloak")
        self.assertEqual(issuer, f"{kc['KC_HOSTNAME']}/realms/{self.realm['realm']}")
        self.assertTrue(kc["KC_HOSTNAME"].endswith(":" + kc["KC_HTTP_PORT"]))
        self.assertIn(f"127.0.0.1:{kc['KC_HTTP_PORT']}:{kc['KC_HTTP_PORT']}", self.services["netns"]["ports"])
        api = self.services["sample-api"]["command"]
        self.assertEqual(api[api.index("--issuer") + 1], issuer)

    def test_keycloak_imports_the_realm(self):
        kc = self.services["keycloak"]
        self.assertIn("--import-realm", kc["command"])
        self.assertIn(
            "./realm-vestibule.json:/opt/keycloak/data/import/realm-vestibule.json:ro", kc["volumes"]
        )
        self.assertIn("VESTIBULE_CLIENT_SECRET", self.env("keycloak"))
        self.assertEqual(
            self.env("keycloak")["VESTIBULE_CLIENT_SECRET"],
            self.env(next(iter(self.vestibules)))["VESTIBULE_CLIENT_SECRET"],
        )

    def test_static_files_are_mounted_where_static_dir_points(self):
        static = [r for r in self.config["routes"] if "static_dir" in r]
        self.assertEqual(len(static), 1)
        rel = static[0]["static_dir"]
        self.assertTrue((COMPOSE_DIR / rel / "index.html").is_file())
        for svc in self.vestibules.values():
            self.assertIn(f"./public:/etc/vestibule/{Path(rel).name}:ro", svc["volumes"])

    def test_vestibule_containers_are_locked_down(self):
        for name, svc in self.vestibules.items():
            with self.subTest(replica=name):
                self.assertTrue(svc["read_only"])
                self.assertEqual(svc["cap_drop"], ["ALL"])
                self.assertIn("no-new-privileges:true", svc["security_opt"])


class RealmTest(unittest.TestCase):
    def setUp(self):
        self.realm = json.loads((COMPOSE_DIR / "realm-vestibule.json").read_text())
        self.config = load_toml(self, COMPOSE_DIR / "config.toml")
        clients = [c for c in self.realm["clients"] if c["clientId"] == self.config["oidc"]["client_id"]]
        self.assertEqual(len(clients), 1, "the realm has the client the config names")
        self.client = clients[0]
        self.public_url = self.config["server"]["public_url"]
        self.prefix = self.config["server"]["bff_prefix"]

    def test_client_is_confidential_with_the_secret_from_the_environment(self):
        self.assertIs(self.client["publicClient"], False)
        self.assertEqual(self.client["clientAuthenticatorType"], "client-secret")
        self.assertEqual(self.client["secret"], "${VESTIBULE_CLIENT_SECRET}")
        self.assertTrue(self.client["standardFlowEnabled"])
        self.assertFalse(self.client["directAccessGrantsEnabled"])
        self.assertFalse(self.client["implicitFlowEnabled"])
        self.assertEqual(self.client["attributes"]["pkce.code.challenge.method"], "S256")

    def test_redirect_back_channel_and_post_logout_urls_match_the_config(self):
        self.assertEqual(self.client["redirectUris"], [f"{self.public_url}{self.prefix}/callback"])
        attrs = self.client["attributes"]
        self.assertEqual(
            attrs["post.logout.redirect.uris"],
            self.public_url + self.config["oidc"]["post_logout_redirect"],
        )
        # The demo registers 127.0.0.1 instead of localhost (README.md explains); same path.
        backchannel = attrs["backchannel.logout.url"]
        self.assertEqual(
            backchannel.replace("127.0.0.1", "localhost"),
            f"{self.public_url}{self.prefix}/backchannel-logout",
        )
        self.assertEqual(attrs["backchannel.logout.session.required"], "true")
        self.assertFalse(self.client["frontchannelLogout"])

    def test_refresh_tokens_rotate_and_are_single_use(self):
        self.assertIs(self.realm["revokeRefreshToken"], True)
        self.assertEqual(self.realm["refreshTokenMaxReuse"], 0)

    def test_session_lifetimes_do_not_outlive_keycloaks(self):
        session = self.config["session"]
        self.assertLessEqual(parse_seconds(session["idle_timeout"]), self.realm["ssoSessionIdleTimeout"])
        self.assertLessEqual(parse_seconds(session["absolute_timeout"]), self.realm["ssoSessionMaxLifespan"])

    def test_beta_tester_role_and_users(self):
        roles = {r["name"] for r in self.realm["roles"]["realm"]}
        self.assertIn("beta-tester", roles)
        users = {u["username"]: u for u in self.realm["users"]}
        self.assertIn("beta-tester", users["alice"]["realmRoles"])
        self.assertNotIn("beta-tester", users["bob"].get("realmRoles", []))
        for user in users.values():
            self.assertTrue(user["enabled"])
            self.assertFalse(user["credentials"][0]["temporary"])

    def test_roles_mapper_emits_the_claim_vestibule_reads(self):
        mappers = [m for m in self.client["protocolMappers"] if m["protocolMapper"] == "oidc-usermodel-realm-role-mapper"]
        self.assertEqual(len(mappers), 1)
        config = mappers[0]["config"]
        self.assertEqual(config["claim.name"], self.config["oidc"]["roles_claim"])
        for token in ("id.token.claim", "access.token.claim"):
            self.assertEqual(config[token], "true")
        beta = next(r for r in self.config["routes"] if r["path"] == "/api/beta/")
        self.assertEqual(beta["require"], {"roles": ["beta-tester"]})

    def test_audience_mapper_matches_the_sample_api(self):
        need_yaml(self)
        compose = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
        api = compose["services"]["sample-api"]["command"]
        audience = api[api.index("--audience") + 1]
        mappers = [m for m in self.client["protocolMappers"] if m["protocolMapper"] == "oidc-audience-mapper"]
        self.assertEqual(len(mappers), 1)
        self.assertEqual(mappers[0]["config"]["included.custom.audience"], audience)
        self.assertEqual(mappers[0]["config"]["access.token.claim"], "true")
        listen = api[api.index("--listen") + 1]
        upstreams = {r["upstream"] for r in self.config["routes"] if r["path"].startswith("/api/")}
        self.assertEqual(upstreams, {f"http://{listen}"})


# --- Docs and scripts ---------------------------------------------------------------------------


def toml_key_paths(table, prefix=""):
    """Dotted key paths of a parsed TOML document; arrays of tables use their table name."""
    paths = set()
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("extra_auth_params", "require"):
            paths |= toml_key_paths(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                paths |= toml_key_paths(item, path + ".")
        else:
            paths.add(path)
    return paths


class ScriptsTest(unittest.TestCase):
    """The shell scripts the image build and the benchmarks run (not part of the test suite
    otherwise): each parses, and build-pgo's options behave without building anything."""

    def shell_scripts(self):
        found = []
        for path in sorted((ROOT / "scripts").rglob("*")):
            if path.is_file():
                first = path.read_text(errors="replace").splitlines()[:1]
                if first and first[0].startswith("#!") and "bash" in first[0]:
                    found.append(path)
        return found

    def test_every_bash_script_parses(self):
        scripts = self.shell_scripts()
        names = {p.name for p in scripts}
        for needed in ("build-pgo", "bench", "test"):
            self.assertIn(needed, names)
        for path in scripts:
            done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            self.assertEqual(done.returncode, 0, f"{path}: {done.stderr}")

    def test_build_pgo_answers_help_and_refuses_unknown_options(self):
        script = str(ROOT / "scripts" / "build-pgo")
        shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn("--print-path", shown.stdout)
        refused = subprocess.run([script, "--frobnicate"], capture_output=True, text=True, timeout=30)
        self.assertEqual(refused.returncode, 2)
        self.assertIn("unknown option", refused.stderr)
        self.assertEqual(refused.stdout, "", "nothing but a path may reach stdout")


class DocsTest(unittest.TestCase):
    def test_provider_guides_exist(self):
        for name in ("keycloak", "entra-id", "auth0", "okta", "google"):
            text = (ROOT / "docs" / "providers" / f"{name}.md").read_text()
            with self.subTest(provider=name):
                self.assertIn("/bff/callback", text)
                self.assertIn("ack-channel logout", text)

    def test_configuration_reference_documents_every_key_the_deploy_configs_use(self):
        doc = (ROOT / "docs" / "configuration.md").read_text()
        for path in DEPLOY.rglob("config.toml"):
            for key in sorted(toml_key_paths(load_toml(self, path))):
                leaf = key.split(".")[-1]
                with self.subTest(config=str(path.relative_to(ROOT)), key=key):
                    self.assertRegex(doc, rf"`{re.escape(leaf)}`")

    def test_the_oauth2_proxy_guide_maps_flags_to_keys_that_exist(self):
        guide = (ROOT / "docs" / "migrating-from-oauth2-proxy.md").read_text()
        reference = (ROOT / "docs" / "configuration.md").read_text()
        rows = [line for line in guide.splitlines() if line.startswith("| `--")]
        self.assertGreaterEqual(len(rows), 30, "a row per common oauth2-proxy flag")
        keys = set()
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            self.assertEqual(len(cells), 3, row)
            keys |= set(re.findall(r"`((?:server|admin|oidc|session|limits)(?:\.[a-z_]+)+)", cells[1]))
        self.assertGreaterEqual(len(keys), 20)
        for key in sorted(keys):
            with self.subTest(key=key):
                section, leaf = key.rsplit(".", 1)
                self.assertRegex(reference, rf"## `\[{re.escape(section)}\]`[\s\S]*?\| `{re.escape(leaf)}` \|")

    def test_rotation_steps_show_the_keys_lines(self):
        doc = (ROOT / "docs" / "deployment.md").read_text()
        self.assertIn('keys = ["${VESTIBULE_SESSION_KEY}", "${VESTIBULE_SESSION_KEY_NEXT}"]', doc)
        self.assertIn('keys = ["${VESTIBULE_SESSION_KEY}", "${VESTIBULE_SESSION_KEY_OLD}"]', doc)

    def test_check_configs_script_is_executable_and_covers_deploy(self):
        script = ROOT / "tests" / "deploy" / "check_configs.sh"
        self.assertTrue(script.stat().st_mode & 0o111, "chmod +x tests/deploy/check_configs.sh")
        text = script.read_text()
        self.assertIn("${VESTIBULE_BIN:-target/debug/vestibule}", text)
        self.assertIn("check --config", text)
        # Every ${VAR} a deploy config uses is given a dummy value by the script.
        for path in DEPLOY.rglob("config.toml"):
            for var in set(re.findall(r"\$\{([A-Z0-9_]+)\}", path.read_text())):
                where = f"{var} ({path.relative_to(ROOT)})"
                self.assertRegex(text, rf"(?m)^(export )?{var}=", where)
                self.assertRegex(text, rf"(?m)^export [^\n]*\b{var}\b", where)

    def test_readmes_show_how_to_start(self):
        compose_readme = (COMPOSE_DIR / "README.md").read_text()
        self.assertIn("docker compose up", compose_readme)
        self.assertIn("http://localhost:8080", compose_readme)
        k8s_readme = (K8S_DIR / "README.md").read_text()
        for word in ("rediss://", "sentinel", "cluster"):
            self.assertIn(word, k8s_readme)


if __name__ == "__main__":
    unittest.main()
