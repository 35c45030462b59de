/*! HiredHands chat widget: <script src="https://<deployment>/widget.js" data-hiredhands-key="hh_wk_…" async></script>
 * No framework, no cookies, no third-party requests, no eval or inline handlers. docs/widget-embed.md says why
 * each choice was made (Shadow DOM, where the visitor token lives, retries). */
(() => {
  'use strict';

  // Every visible or announced string, in one place for translation.
  const STRINGS = {
    open: 'Open chat',
    close: 'Close chat',
    title: 'Chat',
    restart: 'Start a new conversation',
    conversation: 'Conversation',
    message: 'Message',
    placeholder: 'Type your message…',
    send: 'Send',
    you: 'You said:',
    agent: 'Reply:',
    typing: 'Writing a reply…',
    loading: 'Connecting…',
    unavailable: 'Chat is not available on this website right now.',
    offline: "Can't reach the chat right now. Check your connection and try again.",
    cut: 'The connection was lost before the reply finished. Please try again.',
    error: 'Something went wrong. Please try again.',
    tooLong: 'That message is too long. Please shorten it and send it again.',
    rateLimited: (wait) => `You're sending messages a little fast. I'll send yours again in ${wait}.`,
    busy: (wait) => `Sorry, I can't answer right now. I'll try again in ${wait}.`,
    gaveUp: "Sorry, I still can't answer. Please try again later.",
    retry: 'Try again',
    followUp: 'The team will follow up with you here.',
    leadNoted: 'Thanks, the team has your contact details.',
    restarted: 'That conversation has ended, so a new one has started.',
    seconds: (n) => (n === 1 ? '1 second' : `${n} seconds`),
    minutes: (n) => (n === 1 ? '1 minute' : `${n} minutes`),
  };

  const TAG = 'hiredhands-chat';
  const STORE_VERSION = 1;
  const MAX_STORED_MESSAGES = 60;
  const MAX_STORED_CHARS = 4000;
  const MAX_MESSAGE_CHARS = 2000;
  const MAX_AUTO_RETRIES = 3;
  const DEFAULT_ACCENT = '#1f5fbf';

  const script = document.currentScript || document.querySelector('script[data-hiredhands-key]');
  const key = script && script.getAttribute('data-hiredhands-key');
  if (!key || !/^[\w-]{1,100}$/.test(key) || document.querySelector(TAG)) return;
  const api = `${new URL(script.src, location.href).origin}/api/widget/${encodeURIComponent(key)}`;
  const storeKey = `hiredhands:${key}`;

  // -- the conversation, kept in this site's localStorage until its visitor token expires -----------

  const state = { cid: null, token: null, exp: 0, log: [] };

  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(storeKey) || 'null');
      if (!saved || saved.v !== STORE_VERSION || !(saved.exp * 1000 > Date.now())) {
        localStorage.removeItem(storeKey);
        return;
      }
      if (typeof saved.cid !== 'string' || typeof saved.token !== 'string' || !Array.isArray(saved.log)) return;
      state.cid = saved.cid;
      state.token = saved.token;
      state.exp = saved.exp;
      state.log = saved.log.filter((m) => m && typeof m.t === 'string' && /^[van]$/.test(m.r));
    } catch (_) {
      // Storage disabled or corrupt: the conversation lives as long as the page.
    }
  }

  function save() {
    try {
      if (!state.token) return localStorage.removeItem(storeKey);
      const log = state.log.slice(-MAX_STORED_MESSAGES).map((m) => ({ r: m.r, t: m.t.slice(0, MAX_STORED_CHARS) }));
      localStorage.setItem(storeKey, JSON.stringify({ v: STORE_VERSION, cid: state.cid, token: state.token, exp: state.exp, log }));
    } catch (_) {
      // Quota or privacy mode: keep going in memory.
    }
  }

  function forget() {
    state.cid = state.token = null;
    state.exp = 0;
    save();
  }

  // -- styles: one constructed sheet (no <style> element, so a strict style-src is not in the way) --

  const CSS = `
:host{all:initial!important;display:block!important;position:fixed!important;z-index:2147483000!important;
 inset:auto 0 0 auto!important;width:0!important;height:0!important;overflow:visible!important}
[hidden]{display:none!important}
.root{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;-webkit-text-size-adjust:100%}
*,*::before,*::after{box-sizing:border-box}
button,textarea{font:inherit;color:inherit}
:focus-visible{outline:3px solid #111;outline-offset:2px;box-shadow:0 0 0 5px #fff}
.sr{position:absolute;width:1px;height:1px;margin:-1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap;border:0}
.launcher{position:fixed;right:16px;bottom:16px;width:56px;height:56px;border:2px solid #fff;border-radius:50%;
 background:var(--accent);color:var(--on-accent);cursor:pointer;box-shadow:0 2px 10px rgba(0,0,0,.3);display:grid;place-items:center}
.launcher svg{width:28px;height:28px;fill:currentColor}
.panel{position:fixed;right:16px;bottom:84px;width:min(380px,calc(100vw - 32px));height:min(600px,calc(100vh - 100px));
 display:flex;flex-direction:column;background:#fff;border-radius:12px;box-shadow:0 8px 32px rgba(0,0,0,.3);overflow:hidden}
header{display:flex;align-items:center;gap:8px;padding:10px 12px;background:var(--accent);color:var(--on-accent)}
h2{flex:1;margin:0;font-size:17px;font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
header button{background:transparent;border:0;border-radius:6px;min-width:44px;min-height:44px;cursor:pointer;font-size:20px}
.log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px}
.msg{max-width:85%;padding:8px 12px;border-radius:12px;white-space:pre-wrap;overflow-wrap:anywhere}
.v{align-self:flex-end;background:var(--accent);color:var(--on-accent)}
.a{align-self:flex-start;background:#eef1f4;color:#1a1a1a}
.a a{color:#0b4a9e;text-decoration:underline}
.n{align-self:center;max-width:100%;font-size:14px;color:#444;text-align:center}
.n button{margin-left:6px;padding:2px 12px;min-height:44px;border:1px solid #444;border-radius:6px;background:#fff;cursor:pointer}
.typing{letter-spacing:2px}
form{display:flex;gap:8px;padding:10px;border-top:1px solid #d0d5da}
textarea{flex:1;resize:none;min-height:44px;max-height:120px;padding:10px;border:1px solid #6b7280;border-radius:8px;background:#fff}
form button{min-width:64px;min-height:44px;border:0;border-radius:8px;background:var(--accent);color:var(--on-accent);cursor:pointer;font-weight:600}
form button[aria-disabled=true]{opacity:.6;cursor:default}
@media (max-width:480px),(max-height:480px){
 .panel{inset:0;width:auto;height:auto;border-radius:0}
 .launcher[aria-expanded=true]{display:none}}
@media (prefers-reduced-motion:no-preference){
 .panel{animation:rise .18s ease-out}
 .typing span{animation:blink 1.2s infinite}.typing span:nth-child(2){animation-delay:.2s}.typing span:nth-child(3){animation-delay:.4s}
 @keyframes rise{from{opacity:0;transform:translateY(12px)}}
 @keyframes blink{50%{opacity:.2}}}
`;

  // -- colours: the theme's accent, with the text colour that passes WCAG AA on it -------------------

  function luminance(hex) {
    const n = hex.length === 4 ? hex.replace(/\w/g, (c) => c + c) : hex;
    const [r, g, b] = [1, 3, 5].map((i) => {
      const c = parseInt(n.slice(i, i + 2), 16) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  function applyTheme(theme) {
    const accent = theme && typeof theme.accent === 'string' && /^#([\da-f]{3}|[\da-f]{6})$/i.test(theme.accent)
      ? theme.accent : DEFAULT_ACCENT;
    const l = luminance(accent);
    // Black or white, whichever contrasts more: one of them always reaches 4.5:1.
    const onAccent = (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? '#000' : '#fff';
    root.style.setProperty('--accent', accent);
    root.style.setProperty('--on-accent', onAccent);
  }

  // -- DOM, built with createElement and textContent only -------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === 'class') node.className = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  function icon(path) {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    const p = document.createElementNS(ns, 'path');
    p.setAttribute('d', path);
    svg.append(p);
    return svg;
  }

  const host = document.createElement(TAG);
  const shadow = host.attachShadow({ mode: 'open' });
  const sheet = new CSSStyleSheet();
  sheet.replaceSync(CSS);
  shadow.adoptedStyleSheets = [sheet];

  const launcher = el('button', { class: 'launcher', type: 'button', 'aria-label': STRINGS.open, 'aria-expanded': 'false', 'aria-controls': 'panel' },
    icon('M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z'));
  const title = el('h2', { id: 'title' }, STRINGS.title);
  const restartButton = el('button', { type: 'button', 'aria-label': STRINGS.restart, title: STRINGS.restart }, '↺');
  const closeButton = el('button', { type: 'button', 'aria-label': STRINGS.close, title: STRINGS.close }, '×');
  const log = el('div', { class: 'log', tabindex: '0', role: 'region', 'aria-label': STRINGS.conversation });
  const live = el('div', { class: 'sr', 'aria-live': 'polite', 'aria-atomic': 'true' });
  const input = el('textarea', { id: 'input', rows: '1', maxlength: String(MAX_MESSAGE_CHARS), placeholder: STRINGS.placeholder, autocomplete: 'off' });
  const sendButton = el('button', { type: 'submit' }, STRINGS.send);
  const form = el('form', { novalidate: '' }, el('label', { class: 'sr', for: 'input' }, STRINGS.message), input, sendButton);
  const panel = el('div', { class: 'panel', id: 'panel', role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': 'title', hidden: '' },
    el('header', null, title, restartButton, closeButton), log, live, form);
  const root = el('div', { class: 'root' }, launcher, panel);
  shadow.append(root);
  applyTheme(null);

  // -- rendering model output: text only; links only for http(s) --------------------------------------

  // A bare URL, or a Markdown link whose URL is then shown as the link text (no hidden destinations).
  const LINKS = /\[([^\]\n]{1,200})\]\((https?:\/\/[^\s()]+)\)|https?:\/\/[^\s<>"'()[\]{}]+/gi;

  function safeLink(url) {
    let parsed;
    try {
      parsed = new URL(url);
    } catch (_) {
      return null;
    }
    if (parsed.protocol !== 'https:' && parsed.protocol !== 'http:') return null;
    return el('a', { href: parsed.href, target: '_blank', rel: 'noopener noreferrer' }, url);
  }

  function renderText(node, text) {
    const parts = [];
    let last = 0;
    for (const match of text.matchAll(LINKS)) {
      let url = match[2] || match[0];
      let end = match.index + match[0].length;
      const trailing = match[2] ? null : /[.,;:!?]+$/.exec(url);
      if (trailing) {
        url = url.slice(0, -trailing[0].length);
        end -= trailing[0].length;
      }
      const link = safeLink(url);
      if (!link) continue;
      parts.push(text.slice(last, match.index));
      if (match[2]) parts.push(`${match[1]} (`, link, ')');
      else parts.push(link);
      last = end;
    }
    parts.push(text.slice(last));
    node.replaceChildren(...parts);
  }

  function bubble(role, text) {
    const body = el('span');
    const node = el('div', { class: `msg ${role}` }, el('span', { class: 'sr' }, role === 'v' ? STRINGS.you : STRINGS.agent, ' '), body);
    if (role === 'v') body.textContent = text;
    else renderText(body, text);
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  function note(text, action) {
    const node = el('div', { class: 'msg n' }, text);
    if (action) node.append(action);
    log.append(node);
    log.scrollTop = log.scrollHeight;
    announce(text);
    return node;
  }

  function announce(text) {
    live.textContent = '';
    // A fresh text node after a tick so the same sentence twice is still announced.
    setTimeout(() => { live.textContent = text; }, 50);
  }

  // -- open, close, keyboard ----------------------------------------------------------------------------

  let config = null;
  let configLoad = null;
  let busy = false;
  let retryTimer = 0;
  let generation = 0; // bumped by "new conversation", so a reply still on its way is dropped

  function focusables() {
    return [...panel.querySelectorAll('button,textarea,a[href],[tabindex="0"]')].filter((n) => !n.disabled && n.offsetParent !== null);
  }

  async function open() {
    panel.hidden = false;
    launcher.setAttribute('aria-expanded', 'true');
    input.focus();
    configLoad = configLoad || fetchConfig();
  }

  function close() {
    panel.hidden = true;
    launcher.setAttribute('aria-expanded', 'false');
    launcher.focus();
  }

  launcher.addEventListener('click', () => (panel.hidden ? open() : close()));
  closeButton.addEventListener('click', close);
  restartButton.addEventListener('click', () => {
    clearTimeout(retryTimer);
    generation += 1;
    forget();
    state.log = [];
    setBusy(false);
    renderLog();
    input.focus();
  });

  panel.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') {
      event.preventDefault();
      close();
    } else if (event.key === 'Tab') {
      const items = focusables();
      const first = items[0];
      const last = items[items.length - 1];
      const active = shadow.activeElement;
      if (event.shiftKey && (active === first || !panel.contains(active))) {
        event.preventDefault();
        last.focus();
      } else if (!event.shiftKey && (active === last || !panel.contains(active))) {
        event.preventDefault();
        first.focus();
      }
    }
  });

  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!config) await configLoad; // a message typed while the widget is still connecting waits for it
    const text = input.value.trim();
    if (!text || busy || !config) return;
    if (text.length > MAX_MESSAGE_CHARS) return void note(STRINGS.tooLong);
    input.value = '';
    state.log.push({ r: 'v', t: text });
    bubble('v', text);
    deliver(text, 0);
  });

  function setBusy(value) {
    busy = value;
    sendButton.setAttribute('aria-disabled', String(value));
  }

  // -- the API -------------------------------------------------------------------------------------------

  const request = (path, init) => fetch(api + path, { mode: 'cors', credentials: 'omit', cache: 'no-store', ...init });

  async function fetchConfig() {
    const loading = note(STRINGS.loading);
    try {
      const response = await request('/config');
      if (!response.ok) throw new Error(String(response.status));
      config = await response.json();
    } catch (_) {
      // A refused origin gets no CORS headers, so it looks exactly like a network failure: both say "unavailable".
    }
    loading.remove();
    if (!config) {
      input.disabled = true;
      sendButton.setAttribute('aria-disabled', 'true');
      note(STRINGS.unavailable);
      return void closeButton.focus();
    }
    applyTheme(config.theme);
    if (typeof config.display_name === 'string' && config.display_name) title.textContent = config.display_name;
    renderLog();
  }

  function renderLog() {
    log.replaceChildren();
    if (config && typeof config.greeting === 'string' && config.greeting) bubble('a', config.greeting);
    for (const m of state.log) {
      if (m.r === 'n') note(m.t);
      else bubble(m.r, m.t);
    }
  }

  function retryAfterSeconds(response, attempt) {
    const header = response.headers.get('retry-after');
    let wait = Number(header);
    if (header && !Number.isFinite(wait)) wait = (Date.parse(header) - Date.now()) / 1000;
    // Never earlier than the server asked; otherwise an exponential backoff.
    const backoff = Math.min(2 ** attempt * 2, 60);
    return Math.ceil(Math.max(Number.isFinite(wait) ? wait : 0, backoff, 1));
  }

  const duration = (s) => (s < 90 ? STRINGS.seconds(s) : STRINGS.minutes(Math.round(s / 60)));

  function retryButton(text) {
    const button = el('button', { type: 'button' }, STRINGS.retry);
    button.addEventListener('click', () => {
      button.parentNode.remove();
      deliver(text, 0);
    }, { once: true });
    return button;
  }

  function remember(data) {
    if (typeof data.visitor_token !== 'string') return;
    state.cid = data.conversation_id;
    state.token = data.visitor_token;
    state.exp = Number(data.visitor_token_expires_at) || 0;
    save();
  }

  function finishReply(body, text, outcome) {
    log.scrollTop = log.scrollHeight;
    if (!text) body.parentNode.remove();
    else {
      state.log.push({ r: 'a', t: text });
      announce(`${STRINGS.agent} ${text}`);
    }
    if (outcome === 'handed_to_team') state.log.push({ r: 'n', t: STRINGS.followUp }), note(STRINGS.followUp);
    if (outcome === 'lead_captured') state.log.push({ r: 'n', t: STRINGS.leadNoted }), note(STRINGS.leadNoted);
    save();
  }

  async function deliver(text, attempt) {
    const turn = generation;
    setBusy(true);
    const body = bubble('a', '');
    body.append(el('span', { class: 'typing', 'aria-hidden': 'true' }, el('span', null, '•'), el('span', null, '•'), el('span', null, '•')));
    announce(STRINGS.typing);
    const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream, application/json' };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const payload = state.cid && state.token ? { message: text, conversation_id: state.cid } : { message: text };
    let response;
    try {
      response = await request('/chat', { method: 'POST', headers, body: JSON.stringify(payload) });
      if (turn !== generation) return;
    } catch (_) {
      if (turn !== generation) return;
      body.parentNode.remove();
      setBusy(false);
      return void note(STRINGS.offline, retryButton(text));
    }
    if (response.ok && /^text\/event-stream/i.test(response.headers.get('content-type') || '')) {
      await readStream(response, body, text, turn);
    } else if (response.ok) {
      try {
        const data = await response.json();
        if (turn !== generation) return;
        remember(data);
        renderText(body, String(data.reply || ''));
        finishReply(body, String(data.reply || ''), data.status);
      } catch (_) {
        body.parentNode.remove();
        note(STRINGS.cut, retryButton(text));
      }
    } else {
      body.parentNode.remove();
      return void refused(response, text, attempt, turn);
    }
    setBusy(false);
  }

  async function refused(response, text, attempt, turn) {
    let problem = {};
    try {
      problem = await response.json();
    } catch (_) {
      // Not a problem document: handled by status alone.
    }
    if (turn !== generation) return;
    const type = String(problem.type || '');
    const status = response.status;
    if ((type.endsWith('conversation-not-found') || status === 409) && state.token && attempt === 0) {
      // The visitor token expired or the team closed the conversation: start a new one with the same message.
      forget();
      state.log.push({ r: 'n', t: STRINGS.restarted });
      note(STRINGS.restarted);
      return void deliver(text, 1);
    }
    if (status === 429 || status === 503) {
      if (attempt >= MAX_AUTO_RETRIES) {
        setBusy(false);
        return void note(STRINGS.gaveUp, retryButton(text));
      }
      const wait = retryAfterSeconds(response, attempt);
      const notice = note((status === 429 ? STRINGS.rateLimited : STRINGS.busy)(duration(wait)));
      retryTimer = setTimeout(() => {
        notice.remove();
        deliver(text, attempt + 1);
      }, wait * 1000);
      return;
    }
    setBusy(false);
    if (status === 413 || status === 422) return void note(STRINGS.tooLong);
    if (status === 403 || type.endsWith('widget-not-found')) return void note(STRINGS.unavailable);
    note(STRINGS.error, retryButton(text));
  }

  // Server-sent events over fetch (EventSource cannot POST or send headers). docs/widget.md: the contract.
  async function readStream(response, body, question, turn) {
    let text = '';
    // Leaving the page mid-reply keeps what arrived, as the server keeps it (marked partial).
    const keepPartial = () => {
      if (text) state.log.push({ r: 'a', t: text }), save();
    };
    addEventListener('pagehide', keepPartial);
    let outcome = null;
    let done = false;
    let failed = null;
    let event = 'message';
    let data = [];
    const dispatch = () => {
      let payload = null;
      try {
        payload = JSON.parse(data.join('\n'));
      } catch (_) {
        // A malformed event is skipped, like EventSource does with unknown ones.
      }
      if (payload && event === 'conversation') remember(payload);
      else if (payload && event === 'delta' && typeof payload.text === 'string') {
        text += payload.text;
        renderText(body, text);
        log.scrollTop = log.scrollHeight;
      } else if (payload && event === 'tool') outcome = outcome || payload.kind;
      else if (payload && event === 'error') failed = typeof payload.message === 'string' ? payload.message : STRINGS.error;
      else if (payload && event === 'done') {
        done = true;
        if (payload.status === 'handed_to_team') outcome = 'handed_to_team';
      }
      event = 'message';
      data = [];
    };
    const line = (value) => {
      if (value === '') return data.length && dispatch();
      if (value[0] === ':') return;
      const colon = value.indexOf(':');
      const field = colon < 0 ? value : value.slice(0, colon);
      const rest = colon < 0 ? '' : value.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') event = rest;
      else if (field === 'data') data.push(rest);
    };
    try {
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done: ended } = await reader.read();
        if (turn !== generation) return void (removeEventListener('pagehide', keepPartial), reader.cancel());
        buffer += decoder.decode(value || new Uint8Array(), { stream: !ended });
        let match;
        while ((match = /\r\n|\r|\n/.exec(buffer)) && !(match[0] === '\r' && match.index === buffer.length - 1 && !ended)) {
          line(buffer.slice(0, match.index));
          buffer = buffer.slice(match.index + match[0].length);
        }
        if (ended) break;
      }
    } catch (_) {
      // The connection dropped mid-stream: handled below as a stream without "done".
    }
    removeEventListener('pagehide', keepPartial);
    if (!text) renderText(body, '');
    finishReply(body, text, outcome);
    if (failed) {
      state.log.push({ r: 'n', t: failed });
      note(failed, retryButton(question));
    } else if (!done) note(STRINGS.cut, retryButton(question));
    save();
  }

  load();
  (document.body || document.documentElement).append(host);
})();
