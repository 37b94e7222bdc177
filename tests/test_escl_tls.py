"""eSCL over HTTPS, in process on loopback: with a certificate configured the server
speaks TLS only, its job locations are https, and its scanners are announced as
``_uscans._tcp``; the configuration wants the certificate and its key together."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import aiohttp
import pytest

from stillsvc.core.config import Config, ConfigError, DeviceConfig, EsclSettings, parse
from stillsvc.core.manager import DeviceManager
from stillsvc.drivers.sim import SimulatedScanner
from stillsvc.frontends.escl.mdns import SECURE_SERVICE_TYPE, Announcer
from stillsvc.frontends.escl.server import EsclServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")

SETTINGS = ('<scan:ScanSettings xmlns:scan="http://schemas.hp.com/imaging/escl/2011/05/03" '
            'xmlns:pwg="http://www.pwg.org/schemas/2010/12/sm"><pwg:InputSource>Platen</pwg:InputSource>'
            '<scan:ColorMode>Grayscale8</scan:ColorMode><scan:XResolution>75</scan:XResolution>'
            '<scan:YResolution>75</scan:YResolution><pwg:ScanRegions><pwg:ScanRegion><pwg:Width>300</pwg:Width>'
            '<pwg:Height>300</pwg:Height><pwg:XOffset>0</pwg:XOffset><pwg:YOffset>0</pwg:YOffset>'
            '</pwg:ScanRegion></pwg:ScanRegions><scan:DocumentFormatExt>image/png</scan:DocumentFormatExt>'
            '</scan:ScanSettings>')


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "escl.pem", tmp_path / "escl.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
async def server(tmp_path, certificate):
    manager = DeviceManager(Config(runtime_dir=str(tmp_path / "run")), drivers={"sim": SimulatedScanner})
    await manager.add_device(DeviceConfig(id="sim0", driver="sim"))
    escl = EsclServer(manager, EsclSettings(port=0, mdns=False, certificate=str(certificate[0]),
                                            private_key=str(certificate[1])))
    await escl.start()
    escl.url = f"https://127.0.0.1:{escl.servers[0].sockets[0].getsockname()[1]}/eSCL"  # type: ignore[attr-defined]
    yield escl
    await escl.stop()
    await manager.stop()


def client_context(certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.check_hostname = False
    return context


async def test_a_scan_over_https(server, certificate):
    tls = client_context(certificate)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async with http.get(server.url + "/ScannerCapabilities", ssl=tls) as r:
            assert r.status == 200 and b"https://" in await r.read()  # the AdminURI
        async with http.post(server.url + "/ScanJobs", data=SETTINGS, ssl=tls) as r:
            assert r.status == 201, await r.text()
            location = r.headers["Location"]
        assert location.startswith("https://127.0.0.1:")
        async with http.get(location + "/NextDocument", ssl=tls) as r:
            assert r.status == 200 and (await r.read()).startswith(b"\x89PNG")
        async with http.get(location + "/NextDocument", ssl=tls) as r:
            assert r.status == 404
    assert server.manager.devices["sim0"].data_holder is None


async def test_plain_http_to_the_tls_port_gets_no_scanner(server):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(server.url.replace("https:", "http:") + "/ScannerStatus") as r:
                await r.read()
    assert server.manager.sessions == {}


async def test_scanners_are_announced_as_uscans(server):
    info = Announcer(server).info_for(server.manager.devices["sim0"])
    assert info.type == SECURE_SERVICE_TYPE and info.name.endswith("._uscans._tcp.local.")


def test_the_certificate_and_its_key_go_together():
    with pytest.raises(ConfigError, match="go together"):
        parse({"escl": {"certificate": "/etc/stillsvc/escl.pem"}})
    settings = parse({"escl": {"certificate": "/a.pem", "private_key": "/a.key"}}).escl
    assert settings is not None and (settings.certificate, settings.private_key) == ("/a.pem", "/a.key")
    with pytest.raises(ConfigError, match="absolute path"):
        parse({"escl": {"certificate": "a.pem", "private_key": "/a.key"}})
