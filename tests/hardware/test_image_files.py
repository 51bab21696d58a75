"""The image's source files, checked without building it (fast)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import load

IMAGE = Path(__file__).resolve().parents[2] / "hardware" / "image"


def test_manufacturer_template_is_a_valid_agent_config() -> None:
    cfg = load(IMAGE / "crowdfl.toml.example")
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == Path("/etc/crowdfl/ca.crt")
    assert cfg.state_dir == Path("/var/lib/crowdfl-agent")  # where the unit's StateDirectory is
    # real usage from the home's smart plugs, not the simulator; with no [[plugs]] yet, the first
    # boot stops with an error saying so (crowdfl-firstboot)
    assert cfg.source.kind == "none" and cfg.plugs == ()
    assert "no smart plugs configured" in (IMAGE / "overlay/opt/crowdfl/bin/crowdfl-firstboot").read_text()
    # the MQTT password is the systemd credential the image's drop-in loads from /etc/credstore,
    # where crowdfl-firstboot moves crowdfl-mqtt.password from the boot partition
    assert cfg.mqtt.password_file is not None and cfg.mqtt.password is None
    dropin = (IMAGE / "overlay/etc/systemd/system/crowdfl-agent.service.d/10-image.conf").read_text()
    name = cfg.mqtt.password_file.name
    assert cfg.mqtt.password_file.parent == Path("/run/credentials/crowdfl-agent.service")
    assert f"LoadCredential={name}:crowdfl-agent.{name}" in dropin
    firstboot = (IMAGE / "overlay/opt/crowdfl/bin/crowdfl-firstboot").read_text()
    assert f"password:{name}" in firstboot and '"/etc/credstore/crowdfl-agent.${pair#*:}"' in firstboot


@pytest.mark.parametrize("script", ["build.sh", "base.sh", "mkinitrd.sh", "initramfs-init",
                                    "overlay/opt/crowdfl/bin/crowdfl-firstboot", "overlay/opt/crowdfl/bin/crowdfl-health",
                                    "overlay/opt/crowdfl/bin/crowdfl-growroot"])
def test_scripts_parse(script: str) -> None:
    path = IMAGE / script
    shell = "sh" if path.read_text().startswith(("#!/bin/sh", "#!/bin/busybox")) else "bash"
    subprocess.run([shell, "-n", str(path)], check=True)
    if script.startswith("overlay/opt"):
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
