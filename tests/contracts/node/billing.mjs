#!/usr/bin/env node
// billing: a participant of the shop choreography written in Node.js with the `nats` client
// alone, from docs/guide/other-languages.md. It consumes OrderPlaced and emits InvoiceIssued.
//
//   NATS_URL=nats://127.0.0.1:4222 CHOREOGRAPH_NAMESPACE=shop node billing.mjs
//
// The app declares billing's consumers (App(..., external=[External("billing", ...)])); this
// process waits for them, then reads both: `billing~OrderPlaced` (the topic) and `billing`
// (what is sent to billing alone: replayed dead letters).
import { connect, headers as natsHeaders } from "nats";

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const ns = process.env.CHOREOGRAPH_NAMESPACE ?? "choreograph";
const group = "billing";
const stream = `${ns}_events`;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// A topic as one subject token: letters, digits, '_' and '-' stay, every other UTF-8 byte is =XX.
function token(topic) {
  if (/^[A-Za-z0-9_-]+$/.test(topic)) return topic;
  return [...encoder.encode(topic)]
    .map((b) => (/[A-Za-z0-9_-]/.test(String.fromCharCode(b)) ? String.fromCharCode(b)
      : "=" + b.toString(16).toUpperCase().padStart(2, "0")))
    .join("");
}

// The version of an event's data: `dataschema` is urn:choreograph:<type>:v<N>; absent means 1.
function versionOf(event) {
  if (event.dataschema === undefined) return 1;
  const found = /^urn:choreograph:(.+):v([0-9]+)$/.exec(event.dataschema);
  if (!found || found[1] !== event.type) throw new Error(`dataschema ${event.dataschema} not understood`);
  return Number(found[2]);
}

class Invalid extends Error {
  constructor(reason, message) { super(message); this.reason = reason; }
}

const nc = await connect({ servers: url, name: "billing (node)" });
const js = nc.jetstream();

async function consumer(name) {
  // The stream and the consumers exist once the app has started: wait for them.
  for (let tries = 0; ; tries++) {
    try {
      return await js.consumers.get(stream, name);
    } catch (err) {
      if (tries === 0) console.log(`waiting for ${stream} / ${name}`);
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

// Dead-letter the way choreograph does: the body, as it came, into {ns}.dlq.<group> with a
// Choreograph-Dead-Letter header (ASCII JSON), then terminate the message. `choreograph dlq`
// lists, replays and discards it like any other.
async function deadLetter(m, reason, errorType, error) {
  const id = m.headers?.get("Nats-Msg-Id") || `nats:${m.info.streamSequence}`;
  const topicToken = m.subject.split(".").pop();
  const record = {
    id, topic: topicToken, group, reason, error_type: errorType, error, traceback: "",
    attempts: m.info.redeliveryCount, failed_at: Date.now() / 1000,
  };
  const h = natsHeaders();
  h.set("Choreograph-Dead-Letter",
    JSON.stringify(record).replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")));
  await js.publish(`${ns}.dlq.${group}`, m.data, {
    msgID: `dl/${group}/${m.info.streamSequence}/${m.info.redeliveryCount}`, headers: h,
  });
  m.term();
  console.log(`dead-lettered ${id}: ${reason}: ${error}`);
}

async function handle(m) {
  let event;
  try {
    event = JSON.parse(decoder.decode(m.data));
  } catch (err) {
    throw new Invalid("malformed envelope", `not JSON: ${err.message}`);
  }
  if (event?.specversion !== "1.0" || typeof event.id !== "string" || event.type !== "OrderPlaced") {
    throw new Invalid("malformed envelope", "not a CloudEvents 1.0 OrderPlaced");
  }
  let version;
  try { version = versionOf(event); } catch (err) { throw new Invalid("malformed envelope", err.message); }
  // Version 1 is what this code knows; a newer one is read tolerantly (fields it knows).
  const { order_id: orderId, amount } = event.data ?? {};
  if (typeof orderId !== "string" || typeof amount !== "number") {
    throw new Invalid("schema violation", `OrderPlaced v${version}: order_id (string) and amount (number) are required`);
  }
  if (orderId.startsWith("flaky") && m.info.redeliveryCount < 2) {
    console.log(`retry ${orderId} after attempt ${m.info.redeliveryCount}`);
    m.nak(200); // a transient failure: delivered again in 200 ms, attempt + 1
    return;
  }
  const invoice = {
    specversion: "1.0",
    // derived from the order's id: a redelivery publishes the same event, dropped as a duplicate
    id: `invoice-${event.id}`,
    source: group,
    type: "InvoiceIssued",
    time: new Date().toISOString(),
    datacontenttype: "application/json; charset=utf-8",
    dataschema: "urn:choreograph:InvoiceIssued:v1",
    correlationid: event.correlationid ?? event.id,
    causationid: event.id,
    data: { order_id: orderId, amount: Math.round(amount * 120) / 100 },
  };
  if (event.traceparent) invoice.traceparent = event.traceparent;
  await js.publish(`${ns}.ev.${token("InvoiceIssued")}`, encoder.encode(JSON.stringify(invoice)), {
    msgID: invoice.id,
  });
  m.ack(); // only once the invoice is stored: a crash before this redelivers the order
  console.log(`invoiced ${orderId}`);
}

async function run(name) {
  const messages = await (await consumer(name)).consume({ max_messages: 64 });
  console.log(`reading ${stream} / ${name}`);
  for await (const m of messages) {
    try {
      await handle(m);
    } catch (err) {
      if (err instanceof Invalid) await deadLetter(m, err.reason, "Invalid", err.message);
      else { console.error(`retrying after ${err}`); m.nak(1000); }
    }
  }
}

process.on("SIGTERM", () => { nc.drain().then(() => process.exit(0)); });
await Promise.all([run(`${group}~${token("OrderPlaced")}`), run(group)]);
