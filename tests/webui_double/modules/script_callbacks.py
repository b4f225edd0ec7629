import inspect
import os
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])  # script_callbacks.py: ScriptCallback

# script_callbacks.py: callback_map (only the categories the extension uses)
callback_map = dict(callbacks_app_started=[], callbacks_ui_tabs=[], callbacks_ui_settings=[])

reported = []  # double only: what A1111's report_exception() would print; the WebUI carries on


def clear_callbacks():  # script_callbacks.py: clear_callbacks()
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):  # script_callbacks.py: add_callback()
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    callback_name = f"{os.path.basename(filename)}/{category}" + (f"/{name}" if name is not None else "")
    callbacks.append(ScriptCallback(filename, fun, callback_name))


def report_exception(c, job):  # script_callbacks.py: report_exception()
    import sys
    reported.append((c.name, job, sys.exc_info()[1]))


def app_started_callback(demo, app):  # script_callbacks.py: app_started_callback(demo, app)
    for c in callback_map['callbacks_app_started']:
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, 'app_started_callback')


def ui_tabs_callback():  # script_callbacks.py: ui_tabs_callback(); each item is (component, title, elem_id)
    res = []
    for c in callback_map['callbacks_ui_tabs']:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():  # script_callbacks.py: ui_settings_callback()
    for c in callback_map['callbacks_ui_settings']:
        try:
            c.callback()
        except Exception:
            report_exception(c, 'ui_settings_callback')


def on_app_started(callback, *, name=None):  # script_callbacks.py: on_app_started(callback, *, name=None)
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_ui_tabs(callback, *, name=None):  # script_callbacks.py: on_ui_tabs(callback, *, name=None)
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):  # script_callbacks.py: on_ui_settings(callback, *, name=None)
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')
