// Microphone -> 16 kHz 16-bit PCM frames, in the audio thread.
// The context runs at the device rate (`sampleRate`, often 48 kHz); each output sample is
// the mean of the input samples in its 1/16000 s window (a box low-pass, which keeps speech
// intact and folds little back), interpolated across block edges. Frames of `frameSamples`
// (20 ms: smaller than a 200 ms micro-turn, so the server's jitter buffer sees them early)
// go to the page as transferable Int16Array buffers.
class MicSender extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.target = 16000;
    this.step = sampleRate / this.target;    // input samples per output sample
    this.frameSamples = (options.processorOptions || {}).frameSamples || 320;
    this.acc = 0; this.n = 0; this.pos = 0;  // running window sum, count, position in it
    this.frame = new Int16Array(this.frameSamples); this.k = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      this.acc += ch[i]; this.n += 1; this.pos += 1;
      if (this.pos >= this.step) {
        this.pos -= this.step;
        const v = Math.max(-1, Math.min(1, this.acc / this.n));
        this.frame[this.k++] = Math.round(v * 32767);
        this.acc = 0; this.n = 0;
        if (this.k === this.frameSamples) {
          this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
          this.frame = new Int16Array(this.frameSamples); this.k = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor('mic-sender', MicSender);
