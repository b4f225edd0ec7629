"""Hands the DreamBooth tab, its settings and its API routes to the WebUI (A1111, Forge, SD.Next).

Everything host-specific lives in dreambooth_ext/host/webui.py; this file only registers callbacks.
"""
import os
import sys

from modules import script_callbacks

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_host = None


def _importable():
    # The WebUI puts the extension folder on sys.path only while it loads this file (modules/scripts.py
    # load_scripts restores the old list afterwards), so make sure again whenever a callback runs.
    if EXTENSION_DIR not in sys.path:
        sys.path.insert(0, EXTENSION_DIR)


def _get_host():
    global _host
    if _host is None:
        _importable()
        from dreambooth_ext.host.webui import WebUIHost
        _host = WebUIHost()
    return _host


def on_ui_tabs():
    host = _get_host()
    from dreambooth_ext.ui.tab import build_tab
    return [(build_tab(host), "DreamBooth", "dreambooth")]


def on_ui_settings():
    _get_host()
    from dreambooth_ext.host.webui import register_settings
    register_settings()


def on_app_started(demo, app):
    host = _get_host()
    if host.api_enabled():
        from dreambooth_ext.api import add_routes
        add_routes(app, host, credentials=host.api_credentials())


_importable()
# Positional only: SD.Next's on_* functions take no name= keyword.
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
