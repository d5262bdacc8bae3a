// garin demo chat: the GarinChat protocol from a browser, in plain JS.
//
// auth → join → messages; a message with an empty body leaves the room and
// makes the server close with 1000 "bye". Every close shows its code and
// reason in #status. User data only ever reaches the page through
// textContent / attributes set from strings, never through innerHTML.
// The element ids are listed (and kept stable for tests) in index.html.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    connectForm: $("connect-form"),
    connectFields: $("connect-fields"),
    url: $("server-url"),
    token: $("token"),
    username: $("username"),
    room: $("room"),
    connect: $("connect"),
    roomName: $("room-name"),
    userCount: $("user-count"),
    log: $("log"),
    messageForm: $("message-form"),
    message: $("message"),
    send: $("send"),
    leave: $("leave"),
  };

  const MAX_LOG_ENTRIES = 500;
  const LEAVE_GRACE_MS = 3000; // the server closes at once after a leave; this is a fallback

  let ws = null;
  let me = "";
  let opened = false; // the handshake succeeded
  let weClosed = false; // we, not the server, started the close
  let leaveTimer = 0;
  let usernameFromToken = false;

  // -- the page ---------------------------------------------------------------

  function setState(state, text, close) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
    if (close) {
      ui.status.dataset.closeCode = String(close.code);
      ui.status.dataset.closeReason = close.reason;
    } else {
      delete ui.status.dataset.closeCode;
      delete ui.status.dataset.closeReason;
    }
    const joined = state === "joined";
    ui.connectFields.disabled = state === "connecting" || joined || state === "closing";
    ui.message.disabled = !joined;
    ui.send.disabled = !joined;
    ui.leave.disabled = !joined;
    document.body.dataset.state = state;
  }

  function span(className, text) {
    const node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  // One log entry from parts: strings become text, nodes are appended as they are.
  function addEntry(kind, ...parts) {
    const nearBottom = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
    const item = document.createElement("li");
    item.dataset.kind = kind;
    const now = new Date();
    const stamp = document.createElement("time");
    stamp.dateTime = now.toISOString();
    stamp.textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    item.append(stamp, " ");
    for (const part of parts) item.append(part); // append() inserts strings as text nodes
    ui.log.append(item);
    while (ui.log.childElementCount > MAX_LOG_ENTRIES) ui.log.firstElementChild.remove();
    if (nearBottom) ui.log.scrollTop = ui.log.scrollHeight;
    return item;
  }

  function setCount(total) {
    if (Number.isInteger(total)) ui.userCount.textContent = String(total);
  }

  // -- server events ----------------------------------------------------------

  function onEvent(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      event = null;
    }
    const kind = event && typeof event === "object" ? event.type : undefined;
    const who = event && typeof event.username === "string" ? event.username : "?";
    if (kind === "join") {
      setCount(event.totalUsers);
      addEntry("join", span("who", who), ` joined (${event.totalUsers} here)`);
      if (ui.status.dataset.state === "connecting" && who === me) {
        setState("joined", `connected as ${me} in ${ui.roomName.textContent}`);
        ui.message.focus();
      }
    } else if (kind === "userleave") {
      setCount(event.totalUsers);
      addEntry("leave", span("who", who), ` left (${event.totalUsers} here)`);
    } else if (kind === "message") {
      const body = typeof event.body === "string" ? event.body : String(event.body);
      addEntry("message", span("who", who), " ", span("body", body));
    } else {
      addEntry("info", "unrecognised event: ", span("body", String(text)));
    }
  }

  function describeClose(event, url) {
    const code = event.code;
    const reason = event.reason || "";
    if (!opened) {
      return (
        `could not connect to ${url} (${code}): the server is unreachable or refused the ` +
        `handshake; is this page's origin (${location.origin}) in ALLOWED_ORIGINS?`
      );
    }
    if (code === 1006) return "connection lost: 1006 (no close frame from the server)";
    const who = weClosed ? "closed" : "closed by server";
    return `${who}: ${code} ${reason}`.trimEnd();
  }

  // -- actions ----------------------------------------------------------------

  function connect() {
    const url = ui.url.value.trim();
    const token = ui.token.value.trim();
    const room = ui.room.value.trim();
    me = ui.username.value.trim();

    let socket;
    try {
      socket = new WebSocket(url);
    } catch (err) {
      setState("closed", `invalid server URL ${url}: ${err.message}`);
      ui.url.focus();
      return;
    }
    ws = socket;
    opened = false;
    weClosed = false;
    ui.roomName.textContent = room;
    ui.userCount.textContent = "0";
    setState("connecting", `connecting to ${url} as ${me}…`);
    addEntry("info", `connecting to ${url} as `, span("who", me), ` in ${room}`);

    socket.addEventListener("open", () => {
      if (socket !== ws) return;
      opened = true;
      socket.send(JSON.stringify({ type: "auth", body: token }));
      socket.send(JSON.stringify({ type: "join", username: me, room }));
    });
    socket.addEventListener("message", (event) => {
      if (socket !== ws) return;
      if (typeof event.data === "string") onEvent(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== ws) return;
      clearTimeout(leaveTimer);
      ws = null;
      const text = describeClose(event, url);
      setState("closed", text, { code: event.code, reason: event.reason || "" });
      ui.userCount.textContent = "0";
      addEntry(event.code === 1000 ? "info" : "error", text);
      ui.connect.focus();
    });
  }

  function sendMessage() {
    const body = ui.message.value;
    // An empty body means "leave" in this protocol: never send one by accident.
    if (!ws || ui.status.dataset.state !== "joined" || body.trim() === "") return;
    ws.send(JSON.stringify({ type: "message", body }));
    addEntry("own", span("who", me), " ", span("body", body));
    ui.message.value = "";
    ui.message.focus();
  }

  function leave() {
    if (!ws || ui.status.dataset.state !== "joined") return;
    const socket = ws;
    socket.send(JSON.stringify({ type: "message", body: "" }));
    setState("closing", "leaving…");
    leaveTimer = setTimeout(() => {
      if (socket === ws) {
        weClosed = true;
        socket.close(1000, "left");
      }
    }, LEAVE_GRACE_MS);
  }

  // The username defaults to the token's name (or sub) claim; the token is not verified here.
  function nameFromToken(token) {
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      const name = claims.name ?? claims.sub;
      return typeof name === "string" ? name : "";
    } catch {
      return "";
    }
  }

  // -- wiring -----------------------------------------------------------------

  ui.connectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!ws) connect();
  });
  ui.messageForm.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  ui.leave.addEventListener("click", leave);
  ui.username.addEventListener("input", () => {
    usernameFromToken = false;
  });
  ui.token.addEventListener("input", () => {
    if (ui.username.value && !usernameFromToken) return;
    const name = nameFromToken(ui.token.value.trim());
    ui.username.value = name;
    usernameFromToken = name !== "";
  });
  window.addEventListener("pagehide", () => {
    if (ws) {
      weClosed = true;
      ws.close(1000, "page closed");
    }
  });

  setState("idle", "Not connected. Fill in the form and connect.");
})();
