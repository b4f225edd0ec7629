// DreamBooth tab: keep the status, loss plot and samples fresh while a training job runs.
// The tab has a hidden "poll" button; clicking it asks the server for the job's state. We click it
// once when the page is up (a job may already run) and then every second while the status line
// carries the `dreambooth-running` class. The WebUI loads this file itself; the standalone page
// runs it on load.
(function () {
    const POLL_MS = 1000;

    // the WebUI's gradioApp() where there is one; on the standalone page, the same lookup by hand
    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        const app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }

    function pollButton(app) {
        const el = app.querySelector("#dreambooth_poll");
        if (!el) return null;
        return el.tagName === "BUTTON" ? el : el.querySelector("button");
    }

    let polledOnce = false;
    let written = "";  // what the status line last said an ended job wrote
    let sawRunning = false;  // a job ran while this page was open

    function tick() {
        const app = root();
        const button = pollButton(app);
        if (!button) return;
        const running = app.querySelector("#dreambooth_status .dreambooth-running") !== null;
        if (running || !polledOnce) {
            polledOnce = true;
            button.click();
        }
        noticeWritten(app, running);
    }

    // A job that ended has written checkpoints the page has not listed yet: the server's list is already
    // fresh (refreshed under the WebUI's queue lock), so the WebUI's own refresh button brings it to the
    // checkpoint dropdown at the top of the page. A job that ended before the page opened needs nothing.
    function noticeWritten(app, running) {
        const line = app.querySelector("#dreambooth_status [data-dreambooth-written]");
        const now = line ? line.getAttribute("data-dreambooth-written") : "";
        if (sawRunning && now && now !== written) {
            const refresh = app.querySelector("#refresh_sd_model_checkpoint");
            if (refresh) refresh.click();
        }
        written = now;
        sawRunning = sawRunning || running;
    }

    // After "Make it the active checkpoint": the server has switched models; make the WebUI's own
    // checkpoint dropdown list the new file and show it (A1111's refresh button and its
    // selectCheckpoint() from ui.js). Hosts without them (the standalone page) need nothing.
    window.dreamboothShowActive = function (title) {
        if (!title || typeof selectCheckpoint !== "function") return [];
        const refresh = root().querySelector("#refresh_sd_model_checkpoint");
        if (refresh) refresh.click();
        setTimeout(function () { selectCheckpoint(title); }, refresh ? 1500 : 0);
        return [];
    };

    if (!window.dreamboothPolling) {  // the standalone page may run this file a second time
        window.dreamboothPolling = setInterval(tick, POLL_MS);
    }
})();
