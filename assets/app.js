// Voice Relay web page: send your microphone, listen to live streams.
//
// Signalling is JSON over WebSocket (see the wire contract). Sending and
// listening use two separate sockets, because the server gives each
// connection one role. Plain ES module, no dependencies, no build step.
//
// Query parameters:
//   ?server=host[:port][/path]   signalling server (default: this page's host, path /ws)
//   ?token=T                     passed on to the server (WebSocket, MP3 links)
//   ?relay=1                     send and receive only through the TURN servers the
//                                relay hands out (iceTransportPolicy "relay"): to test
//                                a TURN setup, or to hide this device's addresses

const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 30000;
const CONNECT_TIMEOUT_MS = 10000;
const OFFER_TIMEOUT_MS = 10000;
const GATHER_WAIT_MS = 1000;

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/** Split "host[:port][/path][?query]" (an optional scheme is tolerated). */
function parseServer(raw) {
  let s = String(raw || "").trim();
  let scheme = null;
  const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(s);
  if (m) {
    scheme = m[1].toLowerCase();
    s = s.slice(m[0].length);
  }
  s = s.replace(/[?#].*$/, "");
  const slash = s.indexOf("/");
  const host = slash >= 0 ? s.slice(0, slash) : s;
  const path = slash >= 0 ? s.slice(slash) : "";
  return { scheme, host, path };
}

const params = new URLSearchParams(location.search);
const serverParam = params.get("server");
const secureScheme = location.protocol === "https:";

function buildEndpoints() {
  if (!serverParam) {
    return {
      ws: `${secureScheme ? "wss" : "ws"}://${location.host}/ws`,
      http: location.origin,
    };
  }
  const { scheme, host, path } = parseServer(serverParam);
  const secure = scheme ? scheme === "wss" || scheme === "https" : secureScheme;
  return {
    ws: `${secure ? "wss" : "ws"}://${host}${path || "/ws"}`,
    http: `${secure ? "https" : "http"}://${host}`,
  };
}

// ?token=T on the page's URL is passed on to the server (WebSocket and MP3
// links) when the relay runs with --token / --send-token / --listen-token.
const tokenParam = params.get("token");
const withToken = (url) =>
  tokenParam ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(tokenParam)}` : url;
const endpoints = (() => {
  const e = buildEndpoints();
  return { ws: withToken(e.ws), http: e.http };
})();
const mp3Url = (id) => withToken(`${endpoints.http}/stream/${encodeURIComponent(id)}.mp3`);

// ---------------------------------------------------------------------------
// Peer connection configuration
// ---------------------------------------------------------------------------

const forceRelay = params.get("relay") === "1";

/**
 * The RTCPeerConnection configuration for a server message: its ice_servers
 * (STUN/TURN servers from --ice-server, with fresh credentials; absent when the
 * server has none), and iceTransportPolicy "relay" with ?relay=1.
 */
function rtcConfiguration(msg) {
  const iceServers = Array.isArray(msg && msg.ice_servers) ? msg.ice_servers : [];
  return forceRelay ? { iceServers, iceTransportPolicy: "relay" } : { iceServers };
}

/** Records why a STUN/TURN server could not be used (e.g. 401: wrong credentials). */
function watchIceErrors(pc, who) {
  pc.addEventListener("icecandidateerror", (e) => {
    reportError(`${who}: ICE server ${e.url || "?"}: ${e.errorCode} ${e.errorText || ""}`.trim());
  });
}

/** The selected candidate pair of a peer connection, from getStats(). */
async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((r) => {
    if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
  });
  if (!pair) {
    stats.forEach((r) => {
      if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") pair = r;
    });
  }
  if (!pair) return null;
  const local = stats.get(pair.localCandidateId) || {};
  const remote = stats.get(pair.remoteCandidateId) || {};
  return {
    local: { type: local.candidateType, protocol: local.protocol, relayProtocol: local.relayProtocol, url: local.url },
    remote: { type: remote.candidateType, protocol: remote.protocol },
  };
}

// ---------------------------------------------------------------------------
// SDP: prefer Opus with in-band FEC
// ---------------------------------------------------------------------------

/** Put Opus first and make sure its fmtp carries useinbandfec=1 and minptime=10. */
export function preferOpusFec(sdp) {
  const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
  const lines = sdp.split(eol);
  const opus = [];
  lines.forEach((line) => {
    const m = /^a=rtpmap:(\d+) opus\/48000/i.exec(line);
    if (m) opus.push(m[1]);
  });
  if (!opus.length) return sdp;
  for (const pt of opus) {
    const at = lines.findIndex((l) => l.startsWith(`a=fmtp:${pt} `));
    if (at >= 0) {
      const pairs = new Map();
      for (const part of lines[at].slice(`a=fmtp:${pt} `.length).split(";")) {
        const [k, ...v] = part.trim().split("=");
        if (k) pairs.set(k, v.join("="));
      }
      if (!pairs.has("minptime")) pairs.set("minptime", "10");
      pairs.set("useinbandfec", "1");
      lines[at] = `a=fmtp:${pt} ` + [...pairs].map(([k, v]) => `${k}=${v}`).join(";");
    } else {
      const rtp = lines.findIndex((l) => l.startsWith(`a=rtpmap:${pt} `));
      lines.splice(rtp + 1, 0, `a=fmtp:${pt} minptime=10;useinbandfec=1`);
    }
  }
  // Opus first on the audio m-line.
  const mi = lines.findIndex((l) => l.startsWith("m=audio "));
  if (mi >= 0) {
    const parts = lines[mi].split(" ");
    const head = parts.slice(0, 3);
    const pts = parts.slice(3);
    const first = pts.filter((p) => opus.includes(p));
    lines[mi] = [...head, ...first, ...pts.filter((p) => !opus.includes(p))].join(" ");
  }
  return lines.join(eol);
}

/** Wait (bounded) for ICE gathering so the SDP carries our host candidates. */
function waitForGathering(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// ---------------------------------------------------------------------------
// A WebSocket that reconnects with exponential backoff
// ---------------------------------------------------------------------------

class Channel {
  constructor(url, name, handlers) {
    this.url = url;
    this.name = name;
    this.h = handlers; // {onOpen, onMessage, onClose, onState}
    this.ws = null;
    this.wanted = false;
    this.delay = RECONNECT_MIN_MS;
    this.retryAt = 0;
    this.state = "closed"; // closed | connecting | connected | waiting
    this.failures = 0;
    this.retryTimer = null;
    this.connectTimer = null;
    this.chain = Promise.resolve(); // messages are handled one at a time
  }

  open() {
    this.wanted = true;
    if (this.ws || this.retryTimer) return;
    this.connect();
  }

  close() {
    this.wanted = false;
    clearTimeout(this.retryTimer);
    clearTimeout(this.connectTimer);
    this.retryTimer = null;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onopen = ws.onerror = null;
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this.setState("closed");
  }

  /** Connect again right now (the user pressed "retry"). */
  retryNow() {
    if (this.state !== "waiting") return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.connect();
  }

  get isOpen() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }

  send(obj) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(obj));
    log("out", this.name, obj.type);
    return true;
  }

  setState(s) {
    this.state = s;
    this.h.onState?.(s);
  }

  connect() {
    this.retryTimer = null;
    this.setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      log("error", this.name, `bad WebSocket URL ${this.url}: ${e.message}`);
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    this.connectTimer = setTimeout(() => {
      if (ws.readyState === WebSocket.CONNECTING) ws.close();
    }, CONNECT_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(this.connectTimer);
      this.delay = RECONNECT_MIN_MS;
      this.failures = 0;
      this.setState("connected");
      this.h.onOpen?.();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (!msg || typeof msg.type !== "string") return;
      log("in", this.name, msg.type);
      this.chain = this.chain
        .then(() => this.h.onMessage?.(msg))
        .catch((e) => reportError(`${this.name}: ${e && e.message ? e.message : e}`));
    };
    ws.onerror = () => { /* onclose follows */ };
    ws.onclose = () => {
      clearTimeout(this.connectTimer);
      if (this.ws !== ws) return;
      this.ws = null;
      const wasOpen = this.state === "connected";
      this.h.onClose?.(wasOpen);
      if (this.wanted) this.scheduleRetry();
      else this.setState("closed");
    };
  }

  scheduleRetry() {
    this.failures += 1;
    const wait = this.delay;
    this.delay = Math.min(this.delay * 2, RECONNECT_MAX_MS);
    this.retryAt = Date.now() + wait;
    this.retryTimer = setTimeout(() => this.connect(), wait);
    this.setState("waiting");
  }

  secondsLeft() {
    return Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000));
  }
}

// ---------------------------------------------------------------------------
// Audio analysis (level meters, dominant frequency)
// ---------------------------------------------------------------------------

let audioCtx = null;
function ctx() {
  if (!audioCtx) audioCtx = new (window.AudioContext || window.webkitAudioContext)();
  if (audioCtx.state === "suspended") audioCtx.resume().catch(() => {});
  return audioCtx;
}

class Probe {
  constructor(stream) {
    const c = ctx();
    this.src = c.createMediaStreamSource(stream);
    this.an = c.createAnalyser();
    this.an.fftSize = 16384;
    this.an.smoothingTimeConstant = 0;
    this.sink = c.createGain();
    this.sink.gain.value = 0; // keeps the graph running without doubling the sound
    this.src.connect(this.an);
    this.an.connect(this.sink);
    this.sink.connect(c.destination);
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
    try { this.src.disconnect(); this.an.disconnect(); this.sink.disconnect(); } catch { /* gone */ }
  }
}

function meterWidth(rms) {
  if (!rms || rms <= 0) return 0;
  const db = 20 * Math.log10(rms);
  return Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
}

// ---------------------------------------------------------------------------
// Page state and DOM
// ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const el = {};

const state = {
  server: "connecting",       // listener socket: connecting | connected | waiting | closed
  send: "idle",               // idle | requesting-mic | connecting | waiting-ready | offering | negotiating | live | reconnecting
  listen: "idle",             // idle | requesting | connecting | listening
  streamId: null,
  streams: [],
  listeningTo: null,
  messages: [],
  errors: [],
  notice: null,
};

function log(dir, who, what) {
  state.messages.push({ t: Math.round(performance.now()), dir, who, what });
  if (state.messages.length > 300) state.messages.splice(0, state.messages.length - 300);
}

function reportError(text) {
  state.errors.push(text);
  if (state.errors.length > 50) state.errors.shift();
  console.warn("[voice-relay]", text);
}

function showNotice(text, kind = "error") {
  state.notice = text;
  el.noticeText.textContent = text;
  el.notice.dataset.kind = kind;
  el.notice.hidden = false;
}

function clearNotice() {
  state.notice = null;
  el.notice.hidden = true;
}

function setStatus(node, text, kind = "") {
  node.textContent = text;
  if (kind) node.dataset.kind = kind;
  else delete node.dataset.kind;
}

// ---------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------

const sender = {
  channel: null,
  mic: null,       // MediaStream
  probe: null,
  pc: null,
  wanted: false,
};

function micConstraints() {
  return {
    channelCount: 1,
    echoCancellation: el.optEc.checked,
    noiseSuppression: el.optNs.checked,
    autoGainControl: el.optAgc.checked,
  };
}

function setSendState(s, text, kind) {
  state.send = s;
  const on = s !== "idle";
  el.sendBtn.hidden = on;
  el.stopBtn.hidden = !on;
  el.sendBadge.dataset.state = s === "live" ? "live" : on ? "busy" : "idle";
  el.sendBadge.textContent = s === "live" ? "On air" : on ? "Starting" : "Off air";
  if (text !== undefined) setStatus(el.sendStatus, text, kind);
}

function showStreamInfo(id) {
  state.streamId = id;
  el.sendInfo.hidden = !id;
  el.streamIdOut.textContent = id || "";
  el.mp3Url.value = id ? mp3Url(id) : "";
  renderStreams();
}

async function startSending() {
  if (state.send !== "idle") return;
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showNotice(
      "This page is not a secure context, so the browser offers no microphone. " +
      "Open it over HTTPS, or as http://localhost on this machine, to send audio. " +
      "Listening works either way."
    );
    setStatus(el.sendStatus, "Microphone unavailable here (needs HTTPS or localhost).", "error");
    return;
  }
  setSendState("requesting-mic", "Asking for the microphone…");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: micConstraints(), video: false });
  } catch (e) {
    const name = e && e.name;
    let text;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      text = "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and press Send again.";
    } else if (name === "NotFoundError" || name === "DevicesNotFoundError") {
      text = "No microphone was found. Plug one in and press Send again.";
    } else if (name === "NotReadableError") {
      text = "The microphone is busy in another application.";
    } else {
      text = `Could not open the microphone: ${e && e.message ? e.message : e}`;
    }
    reportError(`getUserMedia: ${name || e}`);
    showNotice(text);
    setSendState("idle", "Microphone not available.", "error");
    return;
  }
  sender.mic = stream;
  sender.wanted = true;
  try {
    sender.probe = new Probe(stream);
  } catch (e) {
    reportError(`level meter: ${e.message}`);
  }
  stream.getAudioTracks()[0]?.addEventListener("ended", () => {
    if (sender.wanted) {
      showNotice("The microphone was disconnected.");
      stopSending();
    }
  });
  setSendState("connecting", "Connecting to the server…");
  if (!sender.channel) {
    sender.channel = new Channel(endpoints.ws, "sender", {
      onOpen: beginSendSession,
      onMessage: onSenderMessage,
      onClose: onSenderClosed,
      onState: () => renderServer(),
    });
  }
  if (sender.channel.isOpen) beginSendSession();
  else sender.channel.open();
}

function beginSendSession() {
  if (!sender.wanted) return;
  closeSenderPc();
  showStreamInfo(null);
  sender.channel.send({ type: "start_sending" });
  setSendState("waiting-ready", "Connected. Setting up the stream…");
}

async function onSenderMessage(msg) {
  switch (msg.type) {
    case "sender_ready": {
      if (!sender.wanted || state.send !== "waiting-ready") return;
      if (msg.stream_id) showStreamInfo(msg.stream_id);
      await sendOffer(rtcConfiguration(msg));
      break;
    }
    case "webrtc_answer": {
      if (!sender.pc || state.send !== "offering") return;
      await sender.pc.setRemoteDescription(msg.answer);
      setSendState("negotiating", "Connecting audio…");
      if (sender.pc.connectionState === "connected") onSenderConnected();
      break;
    }
    case "stream_available":
      onStreamAvailable(msg.stream_id, true);
      if (!state.streamId && sender.wanted && ["offering", "negotiating", "live"].includes(state.send)) {
        showStreamInfo(msg.stream_id);
      }
      break;
    case "stream_ended":
      onStreamEnded(msg.stream_id, true);
      if (sender.wanted && msg.stream_id && msg.stream_id === state.streamId) {
        showNotice("The server ended your stream. Press Send to start again.");
        stopSending({ quiet: true });
      }
      break;
    case "error":
      reportError(`server (sender): ${msg.message}`);
      if (sender.wanted && state.send !== "live") {
        showNotice(`The server refused to start the stream: ${msg.message || "unknown error"}`);
        stopSending({ quiet: true });
      } else {
        setStatus(el.sendStatus, `Server: ${msg.message || "error"}`, "error");
      }
      break;
    default:
      break;
  }
}

async function sendOffer(configuration) {
  const track = sender.mic.getAudioTracks()[0];
  const pc = new RTCPeerConnection(configuration);
  sender.pc = pc;
  watchIceErrors(pc, "sender");
  pc.addTransceiver(track, { direction: "sendonly", streams: [sender.mic] });
  pc.onconnectionstatechange = () => {
    if (sender.pc !== pc) return;
    const s = pc.connectionState;
    if (s === "connected") onSenderConnected();
    else if (s === "failed") {
      reportError("sender peer connection failed");
      showNotice("The audio connection to the server failed (a firewall may block UDP). Press Send to try again.");
      stopSending({ quiet: true });
    } else if (s === "disconnected" && state.send === "live") {
      setStatus(el.sendStatus, "Audio connection interrupted, waiting…", "error");
    }
  };
  const offer = await pc.createOffer();
  const munged = preferOpusFec(offer.sdp);
  try {
    await pc.setLocalDescription({ type: "offer", sdp: munged });
  } catch {
    await pc.setLocalDescription(offer);
  }
  await waitForGathering(pc, GATHER_WAIT_MS);
  if (sender.pc !== pc) return;
  setSendState("offering", "Connecting audio…");
  sender.channel.send({ type: "webrtc_offer", offer: { type: "offer", sdp: preferOpusFec(pc.localDescription.sdp) } });
}

function onSenderConnected() {
  if (!sender.wanted) return;
  setSendState("live", "You are live. Everyone listening can hear you.", "ok");
  clearNoticeIf(/stream|microphone|audio connection/i);
}

function clearNoticeIf(re) {
  if (state.notice && re.test(state.notice)) clearNotice();
}

function onSenderClosed(wasOpen) {
  closeSenderPc();
  if (sender.wanted) {
    showStreamInfo(null);
    setSendState("reconnecting", wasOpen ? "Lost the server; your stream stopped. Reconnecting…" : "Server unreachable. Retrying…", "error");
  }
}

function closeSenderPc() {
  if (sender.pc) {
    const pc = sender.pc;
    sender.pc = null;
    pc.onconnectionstatechange = null;
    try { pc.close(); } catch { /* closed */ }
  }
}

function stopSending(opts = {}) {
  const was = state.send;
  sender.wanted = false;
  if (sender.channel) {
    if (was !== "idle") sender.channel.send({ type: "stop_stream" });
    sender.channel.close();
    sender.channel = null;
  }
  closeSenderPc();
  if (sender.probe) { sender.probe.close(); sender.probe = null; }
  if (sender.mic) {
    sender.mic.getTracks().forEach((t) => t.stop());
    sender.mic = null;
  }
  showStreamInfo(null);
  setSendState("idle", opts.quiet ? "Stopped." : "Stopped. The microphone is released.");
  renderServer();
}

// ---------------------------------------------------------------------------
// Listening
// ---------------------------------------------------------------------------

const listener = {
  channel: null,
  pc: null,
  probe: null,
  awaiting: null,     // stream id an offer is awaited for
  offerTimer: null,
  next: undefined,    // a stream asked for while an offer was in flight
  resume: null,       // stream to pick up again after a reconnect
};

function setListenState(s, text, kind) {
  state.listen = s;
  if (text !== undefined) setStatus(el.listenStatus, text, kind);
  renderStreams();
}

function shortId(id) {
  return id;
}

function onStreamAvailable(id, fromSender = false) {
  if (!id || state.streams.includes(id)) return;
  if (fromSender && listener.channel && listener.channel.isOpen) return; // the listener socket reports it too
  state.streams.push(id);
  renderStreams();
}

function onStreamEnded(id, fromSender = false) {
  if (!id) return;
  if (!(fromSender && listener.channel && listener.channel.isOpen)) {
    const i = state.streams.indexOf(id);
    if (i >= 0) state.streams.splice(i, 1);
  }
  if (!fromSender && (state.listeningTo === id || listener.awaiting === id)) {
    stopListening({ send: true });
    setListenState("idle", "The stream you were listening to has ended.", "error");
  }
  renderStreams();
}

function setStreams(list) {
  state.streams = Array.isArray(list) ? list.filter((s) => typeof s === "string") : [];
  const current = state.listeningTo || listener.awaiting;
  if (current && !state.streams.includes(current)) {
    stopListening({ send: true });
    setListenState("idle", "The stream you were listening to has ended.", "error");
  }
  if (listener.resume && state.streams.includes(listener.resume) && state.listen === "idle") {
    const id = listener.resume;
    listener.resume = null;
    listen(id);
  } else {
    listener.resume = null;
  }
  renderStreams();
}

async function onListenerMessage(msg) {
  switch (msg.type) {
    case "available_streams":
      setStreams(msg.streams);
      break;
    case "stream_available":
      onStreamAvailable(msg.stream_id);
      break;
    case "stream_ended":
      onStreamEnded(msg.stream_id);
      break;
    case "webrtc_offer":
      await acceptOffer(msg.offer, rtcConfiguration(msg));
      break;
    case "error":
      reportError(`server (listener): ${msg.message}`);
      if (listener.awaiting) {
        clearTimeout(listener.offerTimer);
        listener.awaiting = null;
        setListenState("idle", `Could not listen: ${msg.message || "server error"}`, "error");
        takeNext();
      }
      break;
    default:
      break;
  }
}

function listen(id) {
  if (!id) return;
  if (state.listeningTo === id || listener.awaiting === id) return;
  try { ctx(); } catch (e) { reportError(`AudioContext: ${e.message}`); }
  el.player.play?.().catch(() => {}); // unlock playback inside the click
  if (listener.awaiting) {
    listener.next = id; // one offer in flight per socket
    return;
  }
  if (!listener.channel.isOpen) {
    setStatus(el.listenStatus, "Not connected to the server yet.", "error");
    return;
  }
  if (listener.pc || state.listeningTo) {
    listener.channel.send({ type: "stop_stream" });
    closeListenerPc();
  }
  state.listeningTo = null;
  listener.awaiting = id;
  listener.channel.send({ type: "start_receiving", stream_id: id });
  setListenState("requesting", `Connecting to ${shortId(id)}…`);
  clearTimeout(listener.offerTimer);
  listener.offerTimer = setTimeout(() => {
    if (listener.awaiting === id) {
      listener.awaiting = null;
      reportError(`no offer for ${id}`);
      setListenState("idle", "The server did not answer. Try again.", "error");
      takeNext();
    }
  }, OFFER_TIMEOUT_MS);
}

function takeNext() {
  const n = listener.next;
  listener.next = undefined;
  if (n && n !== state.listeningTo) listen(n);
  else if (n === null) stopListening({ send: true });
}

async function acceptOffer(offer, configuration) {
  const id = listener.awaiting;
  if (!id) {
    reportError("unexpected webrtc_offer ignored");
    return;
  }
  clearTimeout(listener.offerTimer);
  closeListenerPc();
  const pc = new RTCPeerConnection(configuration);
  listener.pc = pc;
  watchIceErrors(pc, "listener");
  pc.ontrack = (ev) => {
    const stream = ev.streams[0] || new MediaStream([ev.track]);
    el.player.srcObject = stream;
    el.player.muted = false;
    el.player.play().catch((e) => {
      reportError(`play(): ${e.message}`);
      setStatus(el.listenStatus, "Playback was blocked by the browser. Press Listen again.", "error");
    });
    try {
      listener.probe?.close();
      listener.probe = new Probe(stream);
    } catch (e) {
      reportError(`analyser: ${e.message}`);
    }
  };
  pc.onconnectionstatechange = () => {
    if (listener.pc !== pc) return;
    const s = pc.connectionState;
    if (s === "connected") {
      setListenState("listening", `Listening to ${shortId(state.listeningTo)}.`, "ok");
    } else if (s === "failed") {
      reportError("listener peer connection failed");
      stopListening({ send: true });
      setListenState("idle", "The audio connection failed (a firewall may block UDP).", "error");
    }
  };
  await pc.setRemoteDescription(offer);
  const answer = await pc.createAnswer();
  const munged = preferOpusFec(answer.sdp);
  try {
    await pc.setLocalDescription({ type: "answer", sdp: munged });
  } catch {
    await pc.setLocalDescription(answer);
  }
  await waitForGathering(pc, GATHER_WAIT_MS);
  if (listener.pc !== pc) return;
  listener.channel.send({ type: "webrtc_answer", answer: { type: "answer", sdp: preferOpusFec(pc.localDescription.sdp) } });
  state.listeningTo = id;
  listener.awaiting = null;
  if (pc.connectionState === "connected") setListenState("listening", `Listening to ${shortId(id)}.`, "ok");
  else setListenState("connecting", `Connecting to ${shortId(id)}…`);
  if (listener.next !== undefined) takeNext();
}

function closeListenerPc() {
  if (listener.pc) {
    const pc = listener.pc;
    listener.pc = null;
    pc.ontrack = pc.onconnectionstatechange = null;
    try { pc.close(); } catch { /* closed */ }
  }
  if (listener.probe) { listener.probe.close(); listener.probe = null; }
  el.player.pause?.();
  el.player.srcObject = null;
}

function stopListening({ send = true } = {}) {
  if (listener.awaiting) {
    listener.next = null; // stop once the offer in flight is handled
    return;
  }
  if (send && (listener.pc || state.listeningTo) && listener.channel?.isOpen) {
    listener.channel.send({ type: "stop_stream" });
  }
  closeListenerPc();
  state.listeningTo = null;
  setListenState("idle", "Not listening.");
}

function onListenerClosed(wasOpen) {
  if (state.listeningTo || listener.awaiting) {
    listener.resume = state.listeningTo || listener.awaiting;
    clearTimeout(listener.offerTimer);
    listener.awaiting = null;
    listener.next = undefined;
    closeListenerPc();
    state.listeningTo = null;
    setListenState("idle", "Lost the server connection. Playback will resume after reconnecting.", "error");
  }
  if (wasOpen) state.streams = [];
  renderStreams();
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

function renderServer() {
  const ch = listener.channel;
  const s = ch ? ch.state : "closed";
  state.server = s;
  el.serverPill.dataset.state = s;
  if (s === "connected") {
    el.serverPill.textContent = "Connected";
    clearNoticeIf(/unreachable/i);
  } else if (s === "connecting") {
    el.serverPill.textContent = "Connecting…";
  } else if (s === "waiting") {
    const left = ch.secondsLeft();
    el.serverPill.textContent = `Offline · retry in ${left} s`;
    const text = `The server at ${endpoints.ws} is unreachable. Retrying in ${left} s…`;
    if (!state.notice || /unreachable/i.test(state.notice)) showNotice(text, "error");
  } else {
    el.serverPill.textContent = "Disconnected";
  }
}

let lastStreamsKey = "";
function renderStreams() {
  const list = state.streams;
  el.streamCount.textContent = String(list.length);
  el.streamCount.dataset.state = list.length ? "some" : "idle";
  el.streamEmpty.hidden = list.length > 0;
  const current = state.listeningTo || listener.awaiting;
  const key = JSON.stringify([list, current, state.streamId, state.listen]);
  if (key === lastStreamsKey) return;
  lastStreamsKey = key;
  el.streamList.replaceChildren(
    ...list
      .slice()
      .reverse() // newest first on screen
      .map((id) => {
        const li = document.createElement("li");
        li.className = "stream";
        li.dataset.stream = id;
        const active = current === id;
        li.dataset.listening = active ? "1" : "0";

        const main = document.createElement("div");
        main.className = "stream-main";
        const dot = document.createElement("span");
        dot.className = "live-dot";
        dot.setAttribute("aria-hidden", "true");
        const name = document.createElement("code");
        name.className = "stream-name";
        name.textContent = id;
        name.title = id;
        main.append(dot, name);
        if (id === state.streamId) {
          const tag = document.createElement("span");
          tag.className = "stream-tag";
          tag.textContent = "YOU";
          main.append(tag);
        }

        const actions = document.createElement("div");
        actions.className = "stream-actions";
        const btn = document.createElement("button");
        btn.type = "button";
        btn.className = active ? "btn btn-danger listen" : "btn btn-primary listen";
        btn.textContent = active ? (state.listen === "listening" ? "Stop" : "Cancel") : "Listen";
        btn.addEventListener("click", () => (active ? stopListening({ send: true }) : listen(id)));
        const link = document.createElement("a");
        link.className = "btn mp3";
        link.href = mp3Url(id);
        link.target = "_blank";
        link.rel = "noopener";
        link.textContent = "MP3";
        link.title = "Open the live MP3 stream";
        actions.append(btn, link);

        li.append(main, actions);
        return li;
      }),
  );
}

function tick() {
  const send = sender.probe ? meterWidth(sender.probe.level()) : 0;
  const heard = listener.probe && state.listeningTo ? meterWidth(listener.probe.level()) : 0;
  el.sendMeter.style.clipPath = `inset(0 ${(100 - send).toFixed(1)}% 0 0 round 999px)`;
  el.listenMeter.style.clipPath = `inset(0 ${(100 - heard).toFixed(1)}% 0 0 round 999px)`;
  requestAnimationFrame(tick);
}

// ---------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------

function init() {
  Object.assign(el, {
    serverPill: $("server-pill"),
    notice: $("notice"),
    noticeText: $("notice-text"),
    noticeClose: $("notice-close"),
    sendBtn: $("send-btn"),
    stopBtn: $("stop-btn"),
    sendBadge: $("send-badge"),
    sendStatus: $("send-status"),
    sendMeter: $("send-meter"),
    sendInfo: $("send-info"),
    streamIdOut: $("stream-id"),
    mp3Url: $("mp3-url"),
    copyBtn: $("copy-btn"),
    optEc: $("opt-ec"),
    optNs: $("opt-ns"),
    optAgc: $("opt-agc"),
    listenStatus: $("listen-status"),
    listenMeter: $("listen-meter"),
    streamList: $("stream-list"),
    streamEmpty: $("stream-empty"),
    streamCount: $("stream-count"),
    player: $("player"),
    latestLink: $("latest-link"),
    healthLink: $("health-link"),
  });

  el.latestLink.href = withToken(`${endpoints.http}/stream/latest.mp3`);
  el.healthLink.href = `${endpoints.http}/health`;
  el.noticeClose.addEventListener("click", clearNotice);
  el.sendBtn.addEventListener("click", () => startSending().catch((e) => {
    reportError(`send: ${e.message}`);
    showNotice(`Could not start sending: ${e.message}`);
    stopSending({ quiet: true });
  }));
  el.stopBtn.addEventListener("click", () => stopSending());
  el.copyBtn.addEventListener("click", copyMp3Url);
  el.player.addEventListener("play", () => audioCtx?.resume().catch(() => {}));

  if (!window.isSecureContext || !navigator.mediaDevices) {
    showNotice(
      "This page is not a secure context (it is not on HTTPS or localhost), so browsers do not allow " +
      "the microphone here. You can still listen. To send, open the page over HTTPS or as http://localhost.",
      "info",
    );
    setStatus(el.sendStatus, "Sending needs HTTPS or localhost.", "error");
  }

  listener.channel = new Channel(endpoints.ws, "listener", {
    onOpen: () => listener.channel.send({ type: "get_available_streams" }),
    onMessage: onListenerMessage,
    onClose: onListenerClosed,
    onState: renderServer,
  });
  listener.channel.open();
  setInterval(() => { if (listener.channel.state === "waiting") renderServer(); }, 250);
  // Keep the list honest even if a broadcast was missed.
  setInterval(() => { listener.channel.send({ type: "get_available_streams" }); }, 15000);

  window.addEventListener("pagehide", () => {
    if (state.send !== "idle") stopSending({ quiet: true });
    stopListening({ send: true });
  });

  renderStreams();
  renderServer();
  requestAnimationFrame(tick);
}

async function copyMp3Url() {
  const text = el.mp3Url.value;
  if (!text) return;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    el.mp3Url.focus();
    el.mp3Url.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
  }
  el.copyBtn.textContent = ok ? "Copied" : "Select & copy";
  el.copyBtn.dataset.done = ok ? "1" : "0";
  setTimeout(() => { el.copyBtn.textContent = "Copy"; delete el.copyBtn.dataset.done; }, 1800);
}

// Test and debugging hooks.
window.voiceRelay = {
  get endpoints() { return { ...endpoints }; },
  get streamId() { return state.streamId; },
  get streams() { return state.streams.slice(); },
  get sendState() { return state.send; },
  get listenState() { return state.listen; },
  get listeningTo() { return state.listeningTo; },
  get serverState() { return state.server; },
  get senderSocketState() { return sender.channel ? sender.channel.state : "closed"; },
  get notice() { return state.notice; },
  get messages() { return state.messages.slice(); },
  get errors() { return state.errors.slice(); },
  mp3Url,
  preferOpusFec,
  listen,
  stopListening: () => stopListening({ send: true }),
  startSending: () => startSending(),
  stopSending: () => stopSending(),
  /** Dominant frequency (Hz) of what is being heard, or null. */
  listenFrequency: () => (listener.probe && state.listeningTo ? listener.probe.frequency() : null),
  listenLevel: () => (listener.probe && state.listeningTo ? listener.probe.level() : 0),
  micFrequency: () => (sender.probe ? sender.probe.frequency() : null),
  micLevel: () => (sender.probe ? sender.probe.level() : 0),
  /** The selected candidate pair of "send" or "listen" (local/remote type, protocol, relayProtocol). */
  async selectedPair(name) {
    const pc = name === "send" ? sender.pc : listener.pc;
    return pc ? selectedPair(pc) : null;
  },
  /** ICE gathering of "send" or "listen": its state and the types of the candidates in our SDP. */
  gathering(name) {
    const pc = name === "send" ? sender.pc : listener.pc;
    if (!pc) return null;
    const sdp = pc.localDescription ? pc.localDescription.sdp : "";
    const types = [...sdp.matchAll(/^a=candidate:.* typ (\w+)/gm)].map((m) => m[1]);
    return { state: pc.iceGatheringState, types };
  },
  /** The RTCPeerConnection configuration of "send" or "listen" (credentials included: tests only). */
  configuration(name) {
    const pc = name === "send" ? sender.pc : listener.pc;
    return pc ? pc.getConfiguration() : null;
  },
  async stats() {
    const out = {};
    for (const [name, pc] of [["send", sender.pc], ["listen", listener.pc]]) {
      if (!pc) continue;
      (await pc.getStats()).forEach((r) => {
        if (r.type === "outbound-rtp" || r.type === "inbound-rtp") {
          out[name] = { packets: r.packetsSent ?? r.packetsReceived, bytes: r.bytesSent ?? r.bytesReceived, pc: pc.connectionState };
        }
      });
    }
    return out;
  },
};

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
