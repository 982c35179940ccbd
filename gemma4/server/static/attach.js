// Files the user attaches, as the API takes them: images as data: URLs (image_url parts), audio as base64
// WAV or MP3 (input_audio parts). Other audio the browser can decode is re-encoded as 16 kHz 16-bit WAV.

function readAs(file, method) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}: ${reader.error?.message || "unknown error"}`));
    reader[method](file);
  });
}

function base64(bytes) {
  let text = "";
  const step = 0x8000;  // String.fromCharCode takes a bounded number of arguments
  for (let i = 0; i < bytes.length; i += step) text += String.fromCharCode(...bytes.subarray(i, i + step));
  return btoa(text);
}

// Mono 16-bit PCM WAV of a decoded buffer (channels averaged).
function wav(audio) {
  const n = audio.length, rate = audio.sampleRate;
  const out = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => [...s].forEach((c, i) => out.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, 2 * rate, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  text(36, "data"); out.setUint32(40, 2 * n, true);
  const channels = Array.from({ length: audio.numberOfChannels }, (_, c) => audio.getChannelData(c));
  for (let i = 0; i < n; i++) {
    let v = 0;
    for (const ch of channels) v += ch[i];
    v = Math.max(-1, Math.min(1, v / channels.length));
    out.setInt16(44 + 2 * i, v < 0 ? v * 0x8000 : v * 0x7fff, true);
  }
  return new Uint8Array(out.buffer);
}

const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
                        "audio/mpeg": "mp3", "audio/mp3": "mp3" };

export async function attachment(file) {
  if (file.type.startsWith("image/")) {
    return { kind: "image", name: file.name, url: await readAs(file, "readAsDataURL") };
  }
  const format = AUDIO_FORMATS[file.type] || { wav: "wav", mp3: "mp3" }[file.name.split(".").pop().toLowerCase()];
  if (format) {
    return { kind: "audio", name: file.name, format, data: base64(new Uint8Array(await readAs(file, "readAsArrayBuffer"))) };
  }
  if (file.type.startsWith("audio/")) {
    const context = new OfflineAudioContext(1, 1, 16000);  // decoded at 16 kHz: the rate Gemma's audio encoder takes
    let decoded;
    try {
      decoded = await context.decodeAudioData(await readAs(file, "readAsArrayBuffer"));
    } catch {
      throw new Error(`${file.name}: this browser cannot decode ${file.type} audio; attach WAV or MP3`);
    }
    return { kind: "audio", name: file.name, format: "wav", data: base64(wav(decoded)) };
  }
  throw new Error(`${file.name}: only images and audio can be attached`);
}

// The message's content as the API takes it: a plain string, or parts when something is attached.
export function contentOf(message) {
  const attachments = (message.attachments || []).filter((a) => !a.dropped);
  if (!attachments.length) return message.content;
  const parts = attachments.map((a) => (a.kind === "image"
    ? { type: "image_url", image_url: { url: a.url } }
    : { type: "input_audio", input_audio: { data: a.data, format: a.format } }));
  if (message.content) parts.push({ type: "text", text: message.content });
  return parts;
}
