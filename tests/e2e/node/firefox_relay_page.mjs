// Firefox (ESR) on the relay's own page, driven by puppeteer-core over WebDriver BiDi:
// page A sends Firefox's fake microphone, page B listens to that stream, and both report
// what getStats says of their selected candidate pairs; the stream stays live for
// `listenMs` while B listens (the test decodes the relay's MP3 of it meanwhile). Run by
// tests/e2e/test_ice_tcp.py:
//
//   node firefox_relay_page.mjs '{"url": ..., "firefox": ..., "hook": ..., "listenMs": 6000}'
//
// Prints one JSON line: {sid, reception, micLevel, pairsA, pairsB, errors}.
import puppeteer from "puppeteer-core";

const cfg = JSON.parse(process.argv[2]);
const errors = [];

async function openPage(browser, name) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => errors.push(`${name}: ${e}`));
  await page.evaluateOnNewDocument(cfg.hook);
  await page.goto(cfg.url, { timeout: 15000 });
  await page.waitForFunction("!!window.voiceRelay && voiceRelay.serverState === 'connected'", { timeout: 10000 });
  return page;
}

// What page B receives for `ms`: its inbound packet count before and after, and the audio
// levels (RFC 6464, the sender's own measure carried by the relay) of the packets it got.
async function reception(page, ms) {
  const packets = "(async () => ((await voiceRelay.stats()).listen || {}).packets || 0)()";
  const levels = "window.__pcs.flatMap((pc) => pc.getReceivers()).flatMap((r) => r.getSynchronizationSources())"
    + ".map((s) => s.audioLevel)";
  const before = await page.evaluate(packets);
  const seen = [];
  const until = Date.now() + ms;
  while (Date.now() < until) {
    seen.push(...(await page.evaluate(levels)));
    await new Promise((r) => setTimeout(r, 250));
  }
  return { packets: [before, await page.evaluate(packets)], levels: seen };
}

const browser = await puppeteer.launch({
  browser: "firefox",
  executablePath: cfg.firefox,
  headless: true,
  protocolTimeout: 30000,
  dumpio: Boolean(cfg.dumpio),
  extraPrefsFirefox: {
    "media.navigator.streams.fake": true,
    "media.navigator.permission.disabled": true,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    // The test's network namespace has only loopback: gather on it, without mDNS names.
    "media.peerconnection.ice.loopback": true,
    "media.peerconnection.ice.obfuscate_host_addresses": false,
    // Firefox gathers every host address only for a page that captures or holds a
    // microphone grant; else only the default route's address, which a loopback-only
    // namespace has not (the listening page captures nothing): grant it by default.
    "media.peerconnection.ice.default_address_only": false,
    "permissions.default.microphone": 1,
  },
});
const result = { sid: null, reception: null, micLevel: null, pairsA: [], pairsB: [], errors };
try {
  const a = await openPage(browser, "A");
  await a.click("#send-btn");
  await a.waitForFunction("voiceRelay.sendState === 'live' && voiceRelay.streamId", { timeout: 25000 });
  result.sid = await a.evaluate("voiceRelay.streamId");
  const b = await openPage(browser, "B");
  const item = `li.stream[data-stream="${result.sid}"]`;
  await b.waitForSelector(item, { timeout: 10000 });
  await b.click(`${item} button.listen`);
  await b.waitForFunction(`voiceRelay.listenState === 'listening' && voiceRelay.listeningTo === '${result.sid}'`, {
    timeout: 20000,
  });
  result.reception = await reception(b, cfg.listenMs);
  // Firefox headless here runs no Web Audio graph: the page's analyser reads silence even
  // for its own fake microphone (reported, so the test can say why it does not use it).
  result.micLevel = await a.evaluate("voiceRelay.micLevel()");
  result.pairsA = await a.evaluate("window.__selectedPairs()");
  result.pairsB = await b.evaluate("window.__selectedPairs()");
  for (const [name, page] of [["A", a], ["B", b]]) {
    const pageErrors = await page.evaluate("voiceRelay.errors");
    for (const e of pageErrors) errors.push(`${name}: ${e}`);
  }
} catch (e) {
  errors.push(String(e && e.stack ? e.stack : e));
} finally {
  console.log(JSON.stringify(result));
  await browser.close().catch(() => {});
}
