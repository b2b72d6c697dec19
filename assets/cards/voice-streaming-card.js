/*
 * Voice streaming cards for Home Assistant dashboards (Lovelace).
 *
 *   custom:voice-sending-card    talk into the browser's microphone
 *   custom:voice-receiving-card  listen to live streams
 *
 * They speak the voice relay's signalling protocol (JSON over WebSocket) and
 * WebRTC. One self-contained file, no imports: it loads as a dashboard
 * resource of type "JavaScript module" and also as a classic <script>.
 */
(() => {
  "use strict";

  const VERSION = "2.0.0";
  const RECONNECT_MIN_MS = 1000;
  const RECONNECT_MAX_MS = 30000;
  const CONNECT_TIMEOUT_MS = 10000;
  const OFFER_TIMEOUT_MS = 10000;
  const GATHER_WAIT_MS = 1000;
  const POLL_MS = 5000;
  const FIRST_POLL_MS = 500;
  const SWITCH_DELAY_MS = 200;
  const DETACH_GRACE_MS = 1500;

  // -------------------------------------------------------------------------
  // Configuration helpers
  // -------------------------------------------------------------------------

  /** host[:port][/path] -> {scheme, host, path}; query and fragment dropped. */
  function splitServerUrl(raw) {
    let s = String(raw == null ? "" : raw).trim();
    let scheme = null;
    const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(s);
    if (m) {
      scheme = m[1].toLowerCase();
      s = s.slice(m[0].length);
    }
    s = s.replace(/[?#].*$/, "");
    const slash = s.indexOf("/");
    return {
      scheme,
      host: slash >= 0 ? s.slice(0, slash) : s,
      path: slash >= 0 ? s.slice(slash) : "",
    };
  }

  /**
   * The STUN/TURN servers a server message hands out (ice_servers in
   * sender_ready and webrtc_offer, from the relay's --ice-server); none when
   * the field is absent, as from older servers.
   */
  function iceServersOf(msg) {
    return Array.isArray(msg && msg.ice_servers) ? msg.ice_servers : [];
  }

  /** The STUN/TURN server URLs a peer connection was configured with (for debugState). */
  function iceServerUrls(pc) {
    if (!pc) return [];
    return pc.getConfiguration().iceServers.flatMap((s) => (Array.isArray(s.urls) ? s.urls : [s.urls]));
  }

  function pageIsSecure() {
    return typeof location !== "undefined" && location.protocol === "https:";
  }

  /**
   * The signalling URL for a server_url. Empty -> this page's host at /ws;
   * no path -> "/"; a path is used as given; wss: when the page is https:
   * (or when the server_url itself says wss:// or https://).
   */
  function signallingUrl(serverUrl) {
    const { scheme, host, path } = splitServerUrl(serverUrl);
    if (!host) return `${pageIsSecure() ? "wss" : "ws"}://${location.host}/ws`;
    const secure = scheme ? scheme === "wss" || scheme === "https" : pageIsSecure();
    return `${secure ? "wss" : "ws"}://${host}${path || "/"}`;
  }

  /** Appends the optional `token` config value (relay started with --token). */
  function withToken(url, token) {
    if (!token) return url;
    return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
  }

  /** Default MP3 address for speakers: http(s)://<server host>/stream/latest.mp3 */
  function defaultStreamUrl(serverUrl) {
    const { scheme, host } = splitServerUrl(serverUrl);
    const h = host || location.host;
    const secure = scheme ? scheme === "wss" || scheme === "https" : pageIsSecure();
    return `${secure ? "https" : "http"}://${h}/stream/latest.mp3`;
  }

  function checkConfig(config, booleans, strings) {
    if (!config || typeof config !== "object" || Array.isArray(config)) {
      throw new Error("Invalid configuration: expected an object");
    }
    for (const k of strings) {
      if (config[k] != null && typeof config[k] !== "string") {
        throw new Error(`Invalid configuration: ${k} must be a string`);
      }
    }
    for (const k of booleans) {
      if (config[k] != null && typeof config[k] !== "boolean") {
        throw new Error(`Invalid configuration: ${k} must be true or false`);
      }
    }
  }

  // -------------------------------------------------------------------------
  // WebRTC helpers
  // -------------------------------------------------------------------------

  /** Opus first on the m-line; its fmtp gets useinbandfec=1 (and minptime=10 if absent). */
  function preferOpusFec(sdp) {
    const eol = sdp.indexOf("\r\n") >= 0 ? "\r\n" : "\n";
    const lines = sdp.split(eol);
    const opus = [];
    for (const line of lines) {
      const m = /^a=rtpmap:(\d+) opus\/48000/i.exec(line);
      if (m) opus.push(m[1]);
    }
    if (!opus.length) return sdp;
    for (const pt of opus) {
      const prefix = `a=fmtp:${pt} `;
      const at = lines.findIndex((l) => l.startsWith(prefix));
      if (at >= 0) {
        const kv = new Map();
        for (const part of lines[at].slice(prefix.length).split(";")) {
          const eq = part.indexOf("=");
          const k = (eq >= 0 ? part.slice(0, eq) : part).trim();
          if (k) kv.set(k, eq >= 0 ? part.slice(eq + 1).trim() : "");
        }
        if (!kv.has("minptime")) kv.set("minptime", "10");
        kv.set("useinbandfec", "1");
        lines[at] = prefix + Array.from(kv, ([k, v]) => `${k}=${v}`).join(";");
      } else {
        const rtp = lines.findIndex((l) => l.startsWith(`a=rtpmap:${pt} `));
        lines.splice(rtp + 1, 0, `${prefix}minptime=10;useinbandfec=1`);
      }
    }
    const mi = lines.findIndex((l) => l.startsWith("m=audio "));
    if (mi >= 0) {
      const parts = lines[mi].split(" ");
      const pts = parts.slice(3);
      lines[mi] = parts.slice(0, 3).concat(pts.filter((p) => opus.includes(p)), pts.filter((p) => !opus.includes(p))).join(" ");
    }
    return lines.join(eol);
  }

  function waitForGathering(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const timer = setTimeout(done, ms);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  async function setLocalMunged(pc, desc) {
    try {
      await pc.setLocalDescription({ type: desc.type, sdp: preferOpusFec(desc.sdp) });
    } catch (e) {
      await pc.setLocalDescription(desc);
    }
  }

  // One AudioContext per page, shared by every card.
  let sharedCtx = null;
  function audioContext() {
    if (!sharedCtx) sharedCtx = new (window.AudioContext || window.webkitAudioContext)();
    if (sharedCtx.state === "suspended") sharedCtx.resume().catch(() => {});
    return sharedCtx;
  }

  class Probe {
    constructor(stream) {
      const ctx = audioContext();
      this.src = ctx.createMediaStreamSource(stream);
      this.an = ctx.createAnalyser();
      this.an.fftSize = 16384;
      this.an.smoothingTimeConstant = 0;
      this.mute = ctx.createGain();
      this.mute.gain.value = 0;
      this.src.connect(this.an);
      this.an.connect(this.mute);
      this.mute.connect(ctx.destination);
      this.td = new Float32Array(this.an.fftSize);
      this.spec = new Float32Array(this.an.frequencyBinCount);
    }

    level() {
      this.an.getFloatTimeDomainData(this.td);
      let s = 0;
      for (let i = 0; i < this.td.length; i++) s += this.td[i] * this.td[i];
      return Math.sqrt(s / this.td.length);
    }

    frequency() {
      this.an.getFloatFrequencyData(this.spec);
      const sp = this.spec;
      let k = 1;
      for (let i = 2; i < sp.length - 1; i++) if (sp[i] > sp[k]) k = i;
      if (!Number.isFinite(sp[k]) || sp[k] < -100) return null;
      const a = sp[k - 1], b = sp[k], c = sp[k + 1];
      const den = a - 2 * b + c;
      const d = den !== 0 ? (0.5 * (a - c)) / den : 0;
      return ((k + d) * this.an.context.sampleRate) / this.an.fftSize;
    }

    close() {
      try {
        this.src.disconnect();
        this.an.disconnect();
        this.mute.disconnect();
      } catch (e) { /* already gone */ }
    }
  }

  function meterPercent(rms) {
    if (!rms || rms <= 0) return 0;
    return Math.max(0, Math.min(100, ((20 * Math.log10(rms) + 60) / 60) * 100));
  }

  // -------------------------------------------------------------------------
  // Signalling socket with reconnect (1 s doubling to 30 s)
  // -------------------------------------------------------------------------

  class Signalling {
    constructor(url, handlers) {
      this.url = url;
      this.h = handlers;
      this.ws = null;
      this.wanted = false;
      this.delay = RECONNECT_MIN_MS;
      this.retryAt = 0;
      this.state = "closed"; // closed | connecting | open | waiting
      this.retryTimer = null;
      this.openTimer = null;
      this.queue = Promise.resolve();
    }

    get isOpen() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }

    open() {
      this.wanted = true;
      if (!this.ws && !this.retryTimer) this._connect();
    }

    close() {
      this.wanted = false;
      clearTimeout(this.retryTimer);
      clearTimeout(this.openTimer);
      this.retryTimer = null;
      const ws = this.ws;
      this.ws = null;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try { ws.close(1000); } catch (e) { /* closed */ }
      }
      this._set("closed");
    }

    /** Send one JSON text frame. */
    send(obj) {
      if (!this.isOpen) return false;
      this.ws.send(JSON.stringify(obj));
      this.h.onSent && this.h.onSent(obj);
      return true;
    }

    secondsLeft() { return Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000)); }

    _set(s) {
      this.state = s;
      this.h.onState && this.h.onState(s);
    }

    _connect() {
      this.retryTimer = null;
      this._set("connecting");
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (e) {
        this.h.onProblem && this.h.onProblem(`Bad server address ${this.url}`);
        this._retry();
        return;
      }
      this.ws = ws;
      this.openTimer = setTimeout(() => {
        if (ws.readyState === WebSocket.CONNECTING) ws.close();
      }, CONNECT_TIMEOUT_MS);
      ws.onopen = () => {
        clearTimeout(this.openTimer);
        this.delay = RECONNECT_MIN_MS;
        this._set("open");
        this.h.onOpen && this.h.onOpen();
      };
      ws.onmessage = (ev) => {
        if (typeof ev.data !== "string") return;
        let msg;
        try { msg = JSON.parse(ev.data); } catch (e) { return; }
        if (!msg || typeof msg.type !== "string") return;
        this.queue = this.queue
          .then(() => this.h.onMessage(msg))
          .catch((e) => this.h.onProblem && this.h.onProblem(String((e && e.message) || e)));
      };
      ws.onerror = () => {};
      ws.onclose = () => {
        clearTimeout(this.openTimer);
        if (this.ws !== ws) return;
        this.ws = null;
        const wasOpen = this.state === "open";
        this.h.onClose && this.h.onClose(wasOpen);
        if (this.wanted) this._retry();
        else this._set("closed");
      };
    }

    _retry() {
      const wait = this.delay;
      this.delay = Math.min(this.delay * 2, RECONNECT_MAX_MS);
      this.retryAt = Date.now() + wait;
      this.retryTimer = setTimeout(() => this._connect(), wait);
      this._set("waiting");
    }
  }

  // -------------------------------------------------------------------------
  // Shared look
  // -------------------------------------------------------------------------

  const STYLE = `
    :host { display: block; }
    *, *::before, *::after { box-sizing: border-box; }
    ha-card, .card {
      display: block;
      padding: 16px;
      box-sizing: border-box;
      color: var(--primary-text-color, #1b2330);
      font-family: var(--paper-font-body1_-_font-family, system-ui, -apple-system, "Segoe UI", Roboto, sans-serif);
    }
    .fallback {
      background: var(--ha-card-background, var(--card-background-color, #fff));
      border-radius: var(--ha-card-border-radius, 12px);
      border: 1px solid var(--divider-color, #e0e0e0);
    }
    [hidden] { display: none !important; }
    .head { display: flex; align-items: center; justify-content: space-between; gap: 8px; margin-bottom: 12px; }
    .title { font-size: 1.15rem; font-weight: 600; }
    .pill {
      display: inline-flex; align-items: center; gap: 6px; padding: 2px 10px; border-radius: 999px;
      font-size: 0.8rem; font-weight: 600; white-space: nowrap;
      background: var(--secondary-background-color, #eef1f6); color: var(--secondary-text-color, #5d6878);
    }
    .pill::before { content: ""; width: 8px; height: 8px; border-radius: 50%; background: currentColor; }
    .pill[data-tone="ok"] { color: var(--success-color, #1a7f37); }
    .pill[data-tone="live"] { color: var(--error-color, #d1242f); }
    .pill[data-tone="warn"] { color: var(--warning-color, #9a6700); }
    button {
      font: inherit; font-weight: 600; cursor: pointer; border-radius: 10px; min-height: 44px; padding: 8px 14px;
      border: 1px solid var(--divider-color, #d0d7de); background: transparent; color: inherit;
      touch-action: manipulation;
    }
    button:disabled { opacity: 0.55; cursor: default; }
    button.primary { background: var(--primary-color, #1f6feb); border-color: var(--primary-color, #1f6feb); color: var(--text-primary-color, #fff); }
    button.danger { background: var(--error-color, #d1242f); border-color: var(--error-color, #d1242f); color: #fff; }
    button.big { width: 100%; min-height: 60px; font-size: 1.1rem; border-radius: 14px; }
    .meter { height: 10px; border-radius: 999px; overflow: hidden; margin: 12px 0 4px; background: var(--secondary-background-color, #e7ebf1); }
    .fill {
      height: 100%; width: 100%;
      background: linear-gradient(90deg, var(--success-color, #1a7f37) 0%, var(--success-color, #1a7f37) 60%, var(--warning-color, #d29922) 82%, var(--error-color, #d1242f) 100%);
      clip-path: inset(0 100% 0 0);
    }
    .fill.rx { background: var(--primary-color, #1f6feb); }
    .msg { margin: 8px 0 0; font-size: 0.9rem; color: var(--secondary-text-color, #5d6878); min-height: 1.3em; overflow-wrap: anywhere; }
    .msg.error { color: var(--error-color, #d1242f); }
    .sub { margin: 6px 0 0; font-size: 0.8rem; color: var(--secondary-text-color, #5d6878); overflow-wrap: anywhere; }
    code { font-family: var(--code-font-family, ui-monospace, Menlo, Consolas, monospace); font-size: 0.9em; }
    ul { list-style: none; margin: 10px 0 0; padding: 0; display: grid; grid-template-columns: minmax(0, 1fr); gap: 8px; }
    ul:empty { display: none; }
    li { display: flex; align-items: center; gap: 8px; padding: 6px 6px 6px 10px; border-radius: 10px; border: 1px solid var(--divider-color, #e0e0e0); }
    li[data-on="1"] { border-color: var(--primary-color, #1f6feb); }
    li button { flex: none; min-width: 76px; }
    li code { flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
    .row { display: flex; gap: 8px; }
    .row button { flex: 1; }
    .empty { margin: 10px 0 0; color: var(--secondary-text-color, #5d6878); font-size: 0.9rem; }
  `;

  function makeShell(host, title, bodyHtml) {
    const root = host.attachShadow({ mode: "open" });
    const haCard = !!customElements.get("ha-card");
    const tag = haCard ? "ha-card" : "div";
    root.innerHTML = `<style>${STYLE}</style>
      <${tag} class="card${haCard ? "" : " fallback"}">
        <div class="head"><span class="title"></span><span class="pill" part="status"></span></div>
        ${bodyHtml}
        <p class="msg" role="status" aria-live="polite"></p>
      </${tag}>`;
    root.querySelector(".title").textContent = title;
    return root;
  }

  function errorText(e) {
    const name = e && e.name;
    if (name === "NotAllowedError" || name === "SecurityError") return "Microphone access was denied. Allow it in the browser's site settings.";
    if (name === "NotFoundError") return "No microphone found.";
    if (name === "NotReadableError") return "The microphone is in use by another application.";
    return `Microphone error: ${(e && e.message) || e}`;
  }

  // -------------------------------------------------------------------------
  // Sending card
  // -------------------------------------------------------------------------

  class VoiceSendingCard extends HTMLElement {
    constructor() {
      super();
      this._config = null;
      this._hass = null;
      this._status = "idle"; // idle | requesting-mic | connecting | connected | streaming | error
      this._streamId = null;
      this._mic = null;
      this._probe = null;
      this._pc = null;
      this._sig = null;
      this._wanted = false;
      this._log = [];
      this._errors = [];
      this._serviceCalls = 0;
      this._detachTimer = null;
      this._raf = null;
    }

    static getStubConfig() {
      return { server_url: "" };
    }

    setConfig(config) {
      checkConfig(config, ["echo_cancellation", "noise_suppression", "auto_gain_control"],
        ["server_url", "target_media_player", "stream_url", "title", "token"]);
      if (config.target_media_player && !/^media_player\.[a-z0-9_]+$/i.test(config.target_media_player)) {
        throw new Error("Invalid configuration: target_media_player must be a media_player entity id");
      }
      if (config.stream_url && !/^https?:\/\//i.test(config.stream_url)) {
        throw new Error("Invalid configuration: stream_url must start with http:// or https://");
      }
      const changed = this._config && this._config.server_url !== config.server_url;
      this._config = Object.assign({}, config);
      if (changed && this._wanted) this.stop();
      if (this._root) this._render();
    }

    set hass(hass) { this._hass = hass; }
    get hass() { return this._hass; }

    getCardSize() { return 3; }

    get wsUrl() { return withToken(signallingUrl(this._config && this._config.server_url), this._config && this._config.token); }
    get streamUrl() {
      return (this._config && this._config.stream_url) || defaultStreamUrl(this._config && this._config.server_url);
    }

    connectedCallback() {
      clearTimeout(this._detachTimer);
      if (!this._root) this._build();
      this._render();
    }

    disconnectedCallback() {
      // Lovelace re-parents cards while editing; only stop if we stay detached.
      clearTimeout(this._detachTimer);
      this._detachTimer = setTimeout(() => { if (!this.isConnected) this.stop(); }, DETACH_GRACE_MS);
    }

    _build() {
      this._root = makeShell(this, (this._config && this._config.title) || "Voice", `
        <button class="talk primary big" type="button">Talk</button>
        <div class="meter" aria-label="Microphone level"><div class="fill"></div></div>
        <p class="sub"></p>`);
      this._talkBtn = this._root.querySelector("button.talk");
      this._fill = this._root.querySelector(".fill");
      this._pill = this._root.querySelector(".pill");
      this._msg = this._root.querySelector(".msg");
      this._sub = this._root.querySelector(".sub");
      this._talkBtn.addEventListener("click", () => (this._wanted ? this.stop() : this.start()));
    }

    _note(text, isError) {
      if (isError) this._errors.push(text);
      if (this._msg) {
        this._msg.textContent = text || "";
        this._msg.classList.toggle("error", !!isError);
      }
    }

    _setStatus(s) {
      this._status = s;
      this._render();
    }

    _render() {
      if (!this._root) return;
      this._root.querySelector(".title").textContent = (this._config && this._config.title) || "Voice";
      const labels = {
        idle: ["Idle", ""], "requesting-mic": ["Microphone…", "warn"], connecting: ["Connecting…", "warn"],
        connected: ["Connected", "ok"], streaming: ["Connected · live", "live"], reconnecting: ["Reconnecting…", "warn"],
        error: ["Error", "warn"],
      };
      const [label, tone] = labels[this._status] || [this._status, ""];
      this._pill.textContent = label;
      this._pill.dataset.tone = tone;
      this._talkBtn.textContent = this._wanted ? "Stop" : "Talk";
      this._talkBtn.className = `talk big ${this._wanted ? "danger" : "primary"}`;
      const bits = [];
      if (this._streamId) bits.push(`Stream ${this._streamId}`);
      if (this._config && this._config.target_media_player) bits.push(`→ ${this._config.target_media_player}`);
      this._sub.textContent = bits.join(" ");
    }

    _meterLoop() {
      const step = () => {
        const p = this._probe ? meterPercent(this._probe.level()) : 0;
        if (this._fill) this._fill.style.clipPath = `inset(0 ${(100 - p).toFixed(1)}% 0 0)`;
        this._raf = this._probe ? requestAnimationFrame(step) : null;
      };
      if (!this._raf) this._raf = requestAnimationFrame(step);
    }

    async start() {
      if (this._wanted) return;
      if (!this._config) throw new Error("setConfig() was not called");
      if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        this._setStatus("error");
        this._note("The microphone needs a secure page: open Home Assistant over HTTPS (or on localhost).", true);
        return;
      }
      this._wanted = true;
      this._setStatus("requesting-mic");
      this._note("");
      const c = this._config;
      let stream;
      try {
        const audio = {
          channelCount: 1,
          echoCancellation: c.echo_cancellation !== false,
          noiseSuppression: c.noise_suppression !== false,
          autoGainControl: c.auto_gain_control !== false,
        };
        stream = await navigator.mediaDevices.getUserMedia({ audio, video: false });
      } catch (e) {
        this._wanted = false;
        this._setStatus("error");
        this._note(errorText(e), true);
        return;
      }
      if (!this._wanted) { // stopped while the prompt was open
        stream.getTracks().forEach((t) => t.stop());
        return;
      }
      this._mic = stream;
      try { this._probe = new Probe(stream); this._meterLoop(); } catch (e) { this._errors.push(`meter: ${e.message}`); }
      this._setStatus("connecting");
      this._sig = new Signalling(this.wsUrl, {
        onOpen: () => this._begin(),
        onMessage: (m) => this._onMessage(m),
        onClose: (wasOpen) => this._onClose(wasOpen),
        onState: (s) => {
          if (s === "waiting" && this._wanted) this._note(`Server unreachable, retrying in ${this._sig.secondsLeft()} s…`, true);
        },
        onSent: (m) => this._log.push({ t: Math.round(performance.now()), out: m.type }),
        onProblem: (t) => this._errors.push(t),
      });
      this._sig.open();
    }

    _begin() {
      if (!this._wanted) return;
      this._closePc();
      this._streamId = null;
      this._sig.send({ type: "start_sending" });
      this._setStatus("connected");
      this._note("");
      const target = this._config.target_media_player;
      if (target) {
        const data = { entity_id: target, media_content_id: this.streamUrl, media_content_type: "music" };
        if (this._hass && typeof this._hass.callService === "function") {
          this._serviceCalls += 1;
          Promise.resolve()
            .then(() => this._hass.callService("media_player", "play_media", data))
            .catch((e) => this._note(`Could not start ${target}: ${(e && e.message) || e}`, true));
        } else {
          this._note(`Cannot start ${target}: no Home Assistant connection`, true);
        }
      }
    }

    async _onMessage(msg) {
      this._log.push({ t: Math.round(performance.now()), in: msg.type });
      if (this._log.length > 200) this._log.splice(0, this._log.length - 200);
      if (msg.type === "sender_ready") {
        if (!this._wanted || this._pc) return;
        if (msg.stream_id) this._streamId = msg.stream_id;
        await this._offer(iceServersOf(msg));
      } else if (msg.type === "webrtc_answer") {
        if (this._pc && this._pc.signalingState === "have-local-offer") {
          await this._pc.setRemoteDescription(msg.answer);
        }
      } else if (msg.type === "stream_available") {
        if (!this._streamId && this._pc) this._streamId = msg.stream_id;
        this._render();
      } else if (msg.type === "stream_ended") {
        if (this._wanted && msg.stream_id && msg.stream_id === this._streamId) {
          this._note("The server ended the stream. Press Talk to start again.", true);
          this.stop();
        }
      } else if (msg.type === "error") {
        // Shown, never fatal.
        this._note(`Server: ${msg.message || "error"}`, true);
      }
    }

    async _offer(iceServers) {
      const track = this._mic.getAudioTracks()[0];
      const pc = new RTCPeerConnection({ iceServers });
      this._pc = pc;
      pc.addTransceiver(track, { direction: "sendonly", streams: [this._mic] });
      pc.onconnectionstatechange = () => {
        if (this._pc !== pc) return;
        if (pc.connectionState === "connected") {
          this._setStatus("streaming");
          this._note("");
        } else if (pc.connectionState === "failed") {
          this._note("Audio connection failed (UDP blocked?)", true);
          this.stop();
        }
      };
      await setLocalMunged(pc, await pc.createOffer());
      await waitForGathering(pc, GATHER_WAIT_MS);
      if (this._pc !== pc) return;
      this._sig.send({ type: "webrtc_offer", offer: { type: "offer", sdp: preferOpusFec(pc.localDescription.sdp) } });
    }

    _onClose(wasOpen) {
      this._closePc();
      this._streamId = null;
      if (this._wanted) {
        this._setStatus("reconnecting");
        if (wasOpen) this._note("Lost the server. Reconnecting…", true);
      }
    }

    _closePc() {
      if (this._pc) {
        const pc = this._pc;
        this._pc = null;
        pc.onconnectionstatechange = null;
        try { pc.close(); } catch (e) { /* closed */ }
      }
    }

    /** Stop talking: stop_stream, close the socket, release the microphone. */
    stop() {
      const was = this._wanted;
      this._wanted = false;
      if (this._sig) {
        if (was) this._sig.send({ type: "stop_stream" });
        this._sig.close();
        this._sig = null;
      }
      this._closePc();
      if (this._probe) { this._probe.close(); this._probe = null; }
      if (this._mic) { this._mic.getTracks().forEach((t) => t.stop()); this._mic = null; }
      this._streamId = null;
      if (this._status !== "error" || was) this._setStatus("idle");
      this._render();
    }

    micLevel() { return this._probe ? this._probe.level() : 0; }

    debugState() {
      return {
        version: VERSION,
        status: this._status,
        talking: this._wanted,
        streamId: this._streamId,
        wsUrl: this.wsUrl,
        streamUrl: this.streamUrl,
        socket: this._sig ? this._sig.state : "closed",
        pcState: this._pc ? this._pc.connectionState : null,
        iceServers: iceServerUrls(this._pc),
        micLevel: this.micLevel(),
        serviceCalls: this._serviceCalls,
        message: this._msg ? this._msg.textContent : "",
        errors: this._errors.slice(),
        log: this._log.slice(-40),
      };
    }
  }

  // -------------------------------------------------------------------------
  // Receiving card
  // -------------------------------------------------------------------------

  class VoiceReceivingCard extends HTMLElement {
    constructor() {
      super();
      this._config = null;
      this._hass = null;
      this._sig = null;
      this._streams = [];
      this._pc = null;
      this._probe = null;
      this._current = null;   // stream being played
      this._awaiting = null;  // stream an offer is awaited for (one in flight per socket)
      this._next = undefined; // asked for while an offer was in flight (null = stop)
      this._offerTimer = null;
      this._pollTimers = [];
      this._switchTimer = null;
      this._userStopped = false;
      this._manual = false;
      this._status = "idle";
      this._log = [];
      this._errors = [];
      this._offers = 0;
      this._detachTimer = null;
      this._raf = null;
      this._blocked = false;
    }

    static getStubConfig() {
      return { server_url: "", auto_play: false };
    }

    setConfig(config) {
      checkConfig(config, ["auto_play"], ["server_url", "title", "token"]);
      const changed = this._config && this._config.server_url !== config.server_url;
      this._config = Object.assign({}, config);
      if (changed && this._sig) {
        this._disconnect();
        if (this.isConnected) this._connect();
      }
      if (this._root) this._render();
    }

    set hass(hass) { this._hass = hass; }
    get hass() { return this._hass; }

    getCardSize() { return 4; }

    get wsUrl() { return withToken(signallingUrl(this._config && this._config.server_url), this._config && this._config.token); }

    connectedCallback() {
      clearTimeout(this._detachTimer);
      if (!this._root) this._build();
      if (!this._sig) this._connect();
      this._render();
    }

    disconnectedCallback() {
      clearTimeout(this._detachTimer);
      this._detachTimer = setTimeout(() => { if (!this.isConnected) this._disconnect(); }, DETACH_GRACE_MS);
    }

    _build() {
      this._root = makeShell(this, (this._config && this._config.title) || "Voice", `
        <div class="row">
          <button class="listen primary big" type="button">Listen</button>
        </div>
        <div class="meter" aria-label="Playback level"><div class="fill rx"></div></div>
        <ul class="streams"></ul>
        <p class="empty">No live streams.</p>
        <audio playsinline></audio>`);
      this._pill = this._root.querySelector(".pill");
      this._msg = this._root.querySelector(".msg");
      this._btn = this._root.querySelector("button.listen");
      this._fill = this._root.querySelector(".fill");
      this._list = this._root.querySelector("ul.streams");
      this._empty = this._root.querySelector(".empty");
      this._audio = this._root.querySelector("audio");
      this._btn.addEventListener("click", () => {
        if (this._blocked) { this._unblock(); return; }
        if (this._current || this._awaiting) {
          this._userStopped = true;
          this.stop();
        } else {
          this._userStopped = false;
          this._manual = false;
          const id = this._streams[this._streams.length - 1];
          if (id) this.listen(id);
          else this._note("No live streams right now.");
        }
      });
    }

    _note(text, isError) {
      if (isError) this._errors.push(text);
      if (this._msg) {
        this._msg.textContent = text || "";
        this._msg.classList.toggle("error", !!isError);
      }
    }

    _connect() {
      this._sig = new Signalling(this.wsUrl, {
        onOpen: () => this._onOpen(),
        onMessage: (m) => this._onMessage(m),
        onClose: (wasOpen) => this._onClose(wasOpen),
        onState: (s) => {
          if (s === "waiting") this._note(`Server unreachable, retrying in ${this._sig.secondsLeft()} s…`, true);
          this._render();
        },
        onSent: (m) => this._log.push({ t: Math.round(performance.now()), out: m.type, id: m.stream_id }),
        onProblem: (t) => this._errors.push(t),
      });
      this._sig.open();
    }

    _disconnect() {
      this._stopPolling();
      this._closePc();
      this._current = this._awaiting = null;
      clearTimeout(this._offerTimer);
      clearTimeout(this._switchTimer);
      if (this._sig) { this._sig.close(); this._sig = null; }
      this._render();
    }

    _onOpen() {
      this._note("");
      this._stopPolling();
      const poll = () => this._sig && this._sig.send({ type: "get_available_streams" });
      poll();
      this._pollTimers.push(setTimeout(poll, FIRST_POLL_MS));
      this._pollTimers.push(setInterval(poll, POLL_MS));
      this._render();
    }

    _stopPolling() {
      this._pollTimers.forEach((t) => { clearTimeout(t); clearInterval(t); });
      this._pollTimers = [];
    }

    _onClose(wasOpen) {
      this._stopPolling();
      clearTimeout(this._offerTimer);
      clearTimeout(this._switchTimer);
      const was = this._current || this._awaiting;
      this._closePc();
      this._current = this._awaiting = null;
      this._next = undefined;
      if (wasOpen) this._streams = [];
      if (was) this._note("Lost the server. Reconnecting…", true);
      this._render();
    }

    _autoOn() { return !!(this._config && this._config.auto_play) && !this._userStopped; }

    async _onMessage(msg) {
      this._log.push({ t: Math.round(performance.now()), in: msg.type, id: msg.stream_id });
      if (this._log.length > 200) this._log.splice(0, this._log.length - 200);
      switch (msg.type) {
        case "available_streams": {
          this._streams = Array.isArray(msg.streams) ? msg.streams.filter((s) => typeof s === "string") : [];
          if (this._current && !this._streams.includes(this._current) && !this._awaiting) {
            this._ended(this._current);
          }
          if (this._autoOn() && !this._current && !this._awaiting && this._streams.length) {
            this.listen(this._streams[this._streams.length - 1]);
          }
          break;
        }
        case "stream_available": {
          const id = msg.stream_id;
          if (id && !this._streams.includes(id)) this._streams.push(id);
          if (this._autoOn() && !this._manual && id) {
            if (!this._current && !this._awaiting) this.listen(id);
            else if (this._current && this._current !== id) {
              // Follow the newest stream: stop, then ask for it a moment later.
              this._sig.send({ type: "stop_stream" });
              this._closePc();
              this._current = null;
              clearTimeout(this._switchTimer);
              this._switchTimer = setTimeout(() => this.listen(id), SWITCH_DELAY_MS);
            }
          }
          break;
        }
        case "stream_ended": {
          const id = msg.stream_id;
          this._streams = this._streams.filter((s) => s !== id);
          if (id && (id === this._current || id === this._awaiting)) this._ended(id);
          break;
        }
        case "webrtc_offer":
          await this._accept(msg.offer, iceServersOf(msg));
          break;
        case "error":
          this._note(`Server: ${msg.message || "error"}`, true);
          if (this._awaiting) {
            clearTimeout(this._offerTimer);
            this._awaiting = null;
            this._takeNext();
          }
          break;
        default:
          break;
      }
      this._render();
    }

    _ended(id) {
      if (this._sig) this._sig.send({ type: "stop_stream" });
      this._closePc();
      if (this._awaiting === id) this._next = null;
      if (this._current === id) this._current = null;
      this._manual = false;
      this._note("The stream ended.");
      if (this._autoOn() && !this._awaiting) {
        const other = this._streams[this._streams.length - 1];
        if (other) this.listen(other);
      }
    }

    /** Listen to a stream (the newest when id is omitted). */
    listen(id) {
      id = id || this._streams[this._streams.length - 1];
      if (!id || !this._sig) return;
      if (id === this._current || id === this._awaiting) return;
      clearTimeout(this._switchTimer);
      try { audioContext(); } catch (e) { this._errors.push(`AudioContext: ${e.message}`); }
      if (this._awaiting) { this._next = id; return; }
      if (!this._sig.isOpen) { this._note("Not connected to the server yet.", true); return; }
      if (this._pc || this._current) {
        this._sig.send({ type: "stop_stream" });
        this._closePc();
        this._current = null;
      }
      this._awaiting = id;
      this._sig.send({ type: "start_receiving", stream_id: id });
      this._status = "requesting";
      this._note(`Connecting to ${id}…`);
      clearTimeout(this._offerTimer);
      this._offerTimer = setTimeout(() => {
        if (this._awaiting === id) {
          this._awaiting = null;
          this._note("The server did not answer.", true);
          this._takeNext();
          this._render();
        }
      }, OFFER_TIMEOUT_MS);
      this._render();
    }

    _takeNext() {
      const n = this._next;
      this._next = undefined;
      if (n === null) this.stop();
      else if (n && n !== this._current) this.listen(n);
    }

    async _accept(offer, iceServers) {
      const id = this._awaiting;
      if (!id) return; // nobody asked
      this._offers += 1;
      clearTimeout(this._offerTimer);
      this._closePc();
      const pc = new RTCPeerConnection({ iceServers });
      this._pc = pc;
      pc.ontrack = (ev) => {
        const stream = ev.streams[0] || new MediaStream([ev.track]);
        this._audio.srcObject = stream;
        this._play();
        try {
          if (this._probe) this._probe.close();
          this._probe = new Probe(stream);
          this._meterLoop();
        } catch (e) {
          this._errors.push(`analyser: ${e.message}`);
        }
      };
      pc.onconnectionstatechange = () => {
        if (this._pc !== pc) return;
        if (pc.connectionState === "connected") {
          this._note(`Listening to ${this._current}.`);
        } else if (pc.connectionState === "failed") {
          this._note("Audio connection failed (UDP blocked?)", true);
          this._closePc();
          this._current = null;
        }
        this._render();
      };
      await pc.setRemoteDescription(offer);
      await setLocalMunged(pc, await pc.createAnswer());
      await waitForGathering(pc, GATHER_WAIT_MS);
      if (this._pc !== pc) return;
      this._sig.send({ type: "webrtc_answer", answer: { type: "answer", sdp: preferOpusFec(pc.localDescription.sdp) } });
      this._current = id;
      this._awaiting = null;
      if (this._next !== undefined) this._takeNext();
    }

    _play() {
      const p = this._audio.play();
      if (p && p.catch) {
        p.then(() => { this._blocked = false; this._render(); }).catch(() => {
          // Autoplay without a tap is often refused (auto_play on a fresh page).
          this._blocked = true;
          this._note("Tap Play to hear the stream (the browser blocked autoplay).");
          this._render();
        });
      }
    }

    _unblock() {
      try { audioContext(); } catch (e) { /* ignore */ }
      this._blocked = false;
      this._play();
    }

    _meterLoop() {
      const step = () => {
        const p = this._probe && this._current ? meterPercent(this._probe.level()) : 0;
        if (this._fill) this._fill.style.clipPath = `inset(0 ${(100 - p).toFixed(1)}% 0 0)`;
        this._raf = this._probe ? requestAnimationFrame(step) : null;
      };
      if (!this._raf) this._raf = requestAnimationFrame(step);
    }

    _closePc() {
      if (this._pc) {
        const pc = this._pc;
        this._pc = null;
        pc.ontrack = pc.onconnectionstatechange = null;
        try { pc.close(); } catch (e) { /* closed */ }
      }
      if (this._probe) { this._probe.close(); this._probe = null; }
      if (this._audio) {
        try { this._audio.pause(); } catch (e) { /* ignore */ }
        this._audio.srcObject = null;
      }
      this._blocked = false;
    }

    /** Stop listening (the socket stays open and the list keeps updating). */
    stop() {
      clearTimeout(this._switchTimer);
      if (this._awaiting) { this._next = null; return; }
      if (this._sig && (this._pc || this._current)) this._sig.send({ type: "stop_stream" });
      this._closePc();
      this._current = null;
      this._manual = false;
      this._note("");
      this._render();
    }

    _status_() {
      const s = this._sig ? this._sig.state : "closed";
      if (s === "waiting") return ["Offline", "warn", "offline"];
      if (s !== "open") return ["Connecting…", "warn", "connecting"];
      if (this._awaiting) return ["Connecting…", "warn", "requesting"];
      if (this._current && this._pc && this._pc.connectionState === "connected") return ["Listening", "live", "listening"];
      if (this._current) return ["Connecting…", "warn", "connecting-audio"];
      return ["Connected", "ok", "connected"];
    }

    _render() {
      if (!this._root) return;
      this._root.querySelector(".title").textContent = (this._config && this._config.title) || "Voice";
      const [label, tone, status] = this._status_();
      this._status = status;
      this._pill.textContent = label;
      this._pill.dataset.tone = tone;
      const busy = !!(this._current || this._awaiting);
      this._btn.textContent = this._blocked ? "Play" : busy ? "Stop" : "Listen";
      this._btn.className = `listen big ${busy && !this._blocked ? "danger" : "primary"}`;
      this._btn.disabled = !busy && !this._streams.length;
      this._empty.hidden = this._streams.length > 0;
      const playing = this._current || this._awaiting;
      const key = JSON.stringify([this._streams, playing]);
      if (key !== this._listKey) {
        this._listKey = key;
        this._list.replaceChildren(...this._streams.slice().reverse().map((id) => {
          const li = document.createElement("li");
          li.dataset.stream = id;
          li.dataset.on = id === playing ? "1" : "0";
          const code = document.createElement("code");
          code.textContent = id;
          code.title = id;
          const b = document.createElement("button");
          b.type = "button";
          b.className = "pick";
          b.textContent = id === playing ? "Playing" : "Play";
          b.disabled = id === playing;
          b.addEventListener("click", () => {
            this._userStopped = false;
            this._manual = true;
            this.listen(id);
          });
          li.append(code, b);
          return li;
        }));
      }
    }

    listenFrequency() { return this._probe && this._current ? this._probe.frequency() : null; }
    listenLevel() { return this._probe && this._current ? this._probe.level() : 0; }

    debugState() {
      return {
        version: VERSION,
        status: this._status,
        wsUrl: this.wsUrl,
        socket: this._sig ? this._sig.state : "closed",
        streams: this._streams.slice(),
        current: this._current,
        awaiting: this._awaiting,
        pcState: this._pc ? this._pc.connectionState : null,
        iceServers: iceServerUrls(this._pc),
        offers: this._offers,
        blocked: this._blocked,
        frequency: this.listenFrequency(),
        level: this.listenLevel(),
        message: this._msg ? this._msg.textContent : "",
        errors: this._errors.slice(),
        log: this._log.slice(-40),
      };
    }
  }

  // -------------------------------------------------------------------------
  // Registration (the file may be loaded twice, under two URLs)
  // -------------------------------------------------------------------------

  if (!customElements.get("voice-sending-card")) customElements.define("voice-sending-card", VoiceSendingCard);
  if (!customElements.get("voice-receiving-card")) customElements.define("voice-receiving-card", VoiceReceivingCard);

  window.customCards = window.customCards || [];
  const known = new Set(window.customCards.map((c) => c && c.type));
  if (!known.has("voice-sending-card")) {
    window.customCards.push({
      type: "voice-sending-card",
      name: "Voice Sending Card",
      description: "Talk through the browser's microphone to the voice relay (optionally starting a media player).",
      preview: false,
    });
  }
  if (!known.has("voice-receiving-card")) {
    window.customCards.push({
      type: "voice-receiving-card",
      name: "Voice Receiving Card",
      description: "Listen to live voice relay streams in the browser.",
      preview: false,
    });
  }

  window.voiceStreamingCards = { version: VERSION, signallingUrl, defaultStreamUrl, preferOpusFec };
  if (window.console && console.info) console.info(`voice-streaming-card ${VERSION} loaded`);
})();
