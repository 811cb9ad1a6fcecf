// The demo page: microphone -> WebSocket -> gapless playback, timeline, events, latency.
// State the tests read lives in window.tml.
(() => {
  const params = new URLSearchParams(location.search);
  const raw = params.get('raw') === '1';   // no echo cancellation (tests, headphones)
  const S = 3200, RATE = 16000, CHUNK_S = 0.2, SHOW_S = 20;
  const tml = window.tml = {
    state: 'idle', hello: null, sentFrames: 0, sentSamples: 0, sentRms: [],
    receivedChunks: 0, text: '', scheduledChunks: 0, underruns: 0, words: [], results: [],
    events: [], errors: [], latency: null, playbackLeadMs: null,
  };
  const $ = (id) => document.getElementById(id);
  const micBtn = $('mic'), delegateBtn = $('delegate'), typed = $('typed');
  let ws = null, micCtx = null, playCtx = null, nextPlay = 0, stream = null;
  let t0 = null;                      // performance.now() of the first frame sent
  let pending = [];                   // 16 kHz samples of the current user chunk (for RMS)
  const userRms = [], modelRms = [];  // per 200 ms chunk

  const status = (s) => { tml.state = s; $('status').textContent = s; };
  const rms = (x) => { let a = 0; for (const v of x) a += v * v; return Math.sqrt(a / Math.max(1, x.length)); };

  function onFrame(buf) {             // a 20 ms frame from the worklet
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(buf);
    if (t0 === null) t0 = performance.now();
    const x = new Int16Array(buf);
    tml.sentFrames += 1; tml.sentSamples += x.length;
    for (const v of x) {
      pending.push(v / 32768);
      if (pending.length === S) { userRms.push(rms(pending)); tml.sentRms.push(userRms.at(-1)); pending = []; }
    }
  }

  function play(buf) {                // one micro-turn of the model's audio, gaplessly
    const x = new Int16Array(buf);
    const f = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) f[i] = x[i] / 32768;
    modelRms.push(rms(f));
    tml.receivedChunks += 1;
    const b = playCtx.createBuffer(1, f.length, RATE);
    b.copyToChannel(f, 0);
    const src = playCtx.createBufferSource();
    src.buffer = b; src.connect(playCtx.destination);
    const now = playCtx.currentTime;
    if (nextPlay < now + 0.02) {      // first chunk, or the queue ran dry: restart a lead
      if (tml.scheduledChunks > 0) tml.underruns += 1;
      nextPlay = now + 0.05;
    }
    src.start(nextPlay);
    tml.playbackLeadMs = Math.round((nextPlay - now) * 1000);
    nextPlay += f.length / RATE;
    tml.scheduledChunks += 1;
  }

  function addLine(html, cls) {
    const d = document.createElement('div');
    if (cls) d.className = cls;
    d.innerHTML = html;
    $('background').appendChild(d);
    $('background').scrollTop = 1e9;
    return d;
  }
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));

  function onEvent(e) {
    tml.events.push(e);
    const k = e.kind, at = `<span class="kind">${esc(k)}</span> ${Number(e.time_s).toFixed(1)} s `;
    if (k === 'word') {
      tml.words.push(e);            // complete words: labels on the timeline
    } else if (k === "text") {
      tml.text += e.text;
      $("words").textContent = tml.text.slice(-4000); $("words").scrollTop = 1e9;
    } else if (k === "background_result") {
      tml.results.push(e);
      addLine(at + `job ${e.job}: <b class="result">${esc(e.text)}</b> (${e.compute_s} s of compute)`);
    } else if (k === 'chart') {
      addLine(at + `<br><img src="${esc(e.url)}" alt="chart">`);
    } else if (k === 'tool_call') {
      addLine(at + `${esc(e.tool)}(${esc(e.args)})`);
    } else if (k === 'tool_result' || k === 'tool_error') {
      addLine(at + `${esc(e.tool)} -> ${esc(e.result || e.error)}`, k === 'tool_error' ? 'error' : '');
    } else if (k === 'reminder' || k === 'text_in') {
      addLine(at + esc(e.text));
    } else if (k === 'delegation') {
      addLine(at + `job ${e.job}${e.forced ? ' (asked)' : ''}`);
    } else if (k === 'error') {
      tml.errors.push(e); addLine(at + esc(e.error), 'error');
    } else if (k !== 'input_missing') {
      addLine(at + esc(JSON.stringify(e)));
    }
  }

  function onLatency(m) {
    tml.latency = m;
    $('latency').textContent = `latency (last 60 s): compute p50 ${m.compute_p50_ms} ms, p99 ${m.compute_p99_ms} ms; ` +
      `end to end (chunk heard -> answer sent) p50 ${m.e2e_p50_ms} ms, p99 ${m.e2e_p99_ms} ms; ` +
      `+ playback lead ${tml.playbackLeadMs} ms; missing chunks ${m.missing_chunks}; sessions ${m.sessions}`;
  }

  function draw() {                   // the last SHOW_S seconds: user, model, words
    const c = $('timeline'), g = c.getContext('2d'), W = c.width, H = c.height;
    g.clearRect(0, 0, W, H);
    const nowS = t0 === null ? 0 : (performance.now() - t0) / 1000;
    const left = Math.max(0, nowS - SHOW_S), x = (s) => (s - left) / SHOW_S * W;
    const peak = Math.max(0.05, ...userRms.slice(-100), ...modelRms.slice(-100));
    const bars = (arr, shift, y0, color) => {
      g.fillStyle = color;
      arr.forEach((v, i) => {
        const s = (i + shift) * CHUNK_S;
        if (s + CHUNK_S < left) return;
        const h = Math.min(1, v / peak) * 55;
        g.fillRect(x(s), y0 - h, W * CHUNK_S / SHOW_S - 1, h);
      });
    };
    bars(userRms, 0, 65, '#3182bd');
    bars(modelRms, 1, 135, '#e6550d');  // chunk t's audio is heard during chunk t+1
    g.fillStyle = '#222'; g.font = '11px system-ui';
    g.fillText('you', 4, 14); g.fillText('model', 4, 84);
    for (const w of tml.words.slice(-60)) if (w.time_s >= left) g.fillText(w.text.slice(0, 14), x(w.time_s), 160);
    g.fillStyle = '#999';
    for (let s = Math.ceil(left); s < left + SHOW_S; s++) g.fillRect(x(s), H - 4, 1, 4);
    requestAnimationFrame(draw);
  }

  async function start() {
    status('connecting');
    const constraints = {audio: {channelCount: 1, echoCancellation: !raw, noiseSuppression: false, autoGainControl: false}};
    stream = await navigator.mediaDevices.getUserMedia(constraints);
    micCtx = new AudioContext();
    playCtx = new AudioContext();
    await micCtx.audioWorklet.addModule('/static/worklet.js');
    const node = new AudioWorkletNode(micCtx, 'mic-sender', {processorOptions: {frameSamples: 320}});
    node.port.onmessage = (m) => onFrame(m.data);
    const src = micCtx.createMediaStreamSource(stream);
    const mute = micCtx.createGain(); mute.gain.value = 0;  // keeps the graph pulling
    src.connect(node); node.connect(mute); mute.connect(micCtx.destination);
    ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/stream`);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => status('connected: speak');
    ws.onclose = (e) => { status(`closed (${e.code}${e.reason ? ': ' + e.reason : ''})`); stop(false); };
    ws.onmessage = (m) => {
      if (typeof m.data !== 'string') return play(m.data);
      const msg = JSON.parse(m.data);
      if (msg.type === 'hello') tml.hello = msg;
      else if (msg.type === 'event') onEvent(msg);
      else if (msg.type === 'latency') onLatency(msg);
      else if (msg.type === 'error') { tml.errors.push(msg); status(`refused: ${msg.reason}`); }
    };
    micBtn.textContent = 'Stop'; micBtn.classList.add('on');
    delegateBtn.disabled = false; typed.disabled = false;
  }

  function stop(closeSocket = true) {
    if (closeSocket && ws) ws.close();
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (micCtx) micCtx.close();
    micCtx = null; stream = null;
    micBtn.textContent = 'Start microphone'; micBtn.classList.remove('on');
    delegateBtn.disabled = true; typed.disabled = true;
  }

  micBtn.onclick = () => (micCtx ? stop() : start().catch((e) => { status(`error: ${e}`); tml.errors.push(String(e)); }));
  delegateBtn.onclick = () => ws && ws.send(JSON.stringify({type: 'delegate'}));
  typed.onkeydown = (e) => {
    if (e.key === 'Enter' && typed.value && ws) { ws.send(JSON.stringify({type: 'text', text: typed.value})); typed.value = ''; }
  };
  tml.start = start; tml.stop = stop;
  tml.delegate = () => delegateBtn.onclick();
  requestAnimationFrame(draw);
  if (params.get('autostart') === '1') micBtn.click();
})();
