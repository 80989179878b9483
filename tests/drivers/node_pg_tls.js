// node-postgres over TLS through the proxy: the certificate verified against the test
// CA for 127.0.0.1 and localhost, SCRAM-SHA-256-PLUS (channel binding) when offered.
// Prints one JSON line of facts for the Rust test to check.
const { Client } = require('pg');
const fs = require('fs');

function client(host, ca) {
  const c = new Client({
    host,
    port: Number(process.env.PROXY_PORT),
    user: 'app',
    password: 'secret',
    database: 'app',
    ssl: { ca: fs.readFileSync(ca), rejectUnauthorized: true },
    enableChannelBinding: true,
  });
  const send = c.connection.sendSASLInitialResponseMessage.bind(c.connection);
  c.connection.sendSASLInitialResponseMessage = (mechanism, response) => {
    c.mechanismUsed = mechanism;
    return send(mechanism, response);
  };
  return c;
}

(async () => {
  const out = {};
  for (const host of ['127.0.0.1', 'localhost']) {
    const c = client(host, process.env.CA_FILE);
    await c.connect();
    const r = await c.query('SELECT pg_is_in_recovery() AS rec, $1::int + 1 AS v', [41]);
    out[host] = {
      rec: r.rows[0].rec,
      v: r.rows[0].v,
      encrypted: c.connection.stream.encrypted === true,
      mechanism: c.mechanismUsed,
    };
    await c.end();
  }
  try {
    const c = client('127.0.0.1', process.env.OTHER_CA_FILE);
    await c.connect();
    out.otherCa = 'connected';
    await c.end();
  } catch (e) {
    out.otherCa = 'refused';
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
