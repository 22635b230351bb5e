// pigment from Node: @grpc/grpc-js + @grpc/proto-loader over the repository's .proto files.
//   cd examples/node && npm install && node quickstart.js [target] [user]
// PIGMENT_API_KEY (optional) is sent as `authorization: Bearer`. Prints one JSON line.
"use strict";
const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const target = process.argv[2] || "127.0.0.1:50051";
const user = process.argv[3] || "node-alice";
const tenant = process.env.PIGMENT_TENANT || "";
const protos = path.join(__dirname, "..", "..", "protos");
// keepCase: fields as in the .proto (snake_case); enums as their names; int64 as strings
const def = loader.loadSync(["pigment/v1/generation.proto", "pigment/v1/history.proto"],
  { includeDirs: [protos], keepCase: true, enums: String, longs: String, defaults: true });
const v1 = grpc.loadPackageDefinition(def).pigment.v1;
const creds = grpc.credentials.createInsecure();
const history = new v1.HistoryService(target, creds);
const generation = new v1.GenerationService(target, creds);

function call(client, method, request, timeoutS = 120) {
  const md = new grpc.Metadata();
  if (process.env.PIGMENT_API_KEY) md.set("authorization", "Bearer " + process.env.PIGMENT_API_KEY);
  return new Promise((resolve, reject) =>
    client[method](request, md, { deadline: Date.now() + timeoutS * 1000 }, (err, resp) =>
      err ? reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`)) : resolve(resp)));
}

async function main() {
  await call(history, "UpsertItems", { items: [{ item_id: `${user}-star`, caption: "a small blue star", tenant }] });
  await call(history, "LogInteractions", {
    user_id: user, create_user: true, tenant, interactions: [{ item_id: `${user}-star`, kind: "like" }] });
  const result = await call(generation, "GeneratePersonalized", {
    request_id: `${user}-first`, user_id: user, prompt: "a star", num_images: 2, num_inference_steps: 2 });
  const ids = result.images.map((i) => i.generation_id);
  const got = await call(generation, "GetGeneration", { generation_id: ids[0], delivery: "IMAGE_DELIVERY_INLINE" });
  const png = got.generation.image.png;
  fs.mkdirSync("quickstart-output", { recursive: true });
  fs.writeFileSync(path.join("quickstart-output", `${ids[0]}.png`), png);
  const fb = await call(generation, "LogFeedback", {
    feedback_id: `${user}-pick`, user_id: user, generation_id: ids[0], kind: "FEEDBACK_KIND_PICK",
    other_generation_ids: ids.slice(1) });
  console.log(JSON.stringify({ generation_ids: ids, keywords: got.generation.keywords, png_bytes: png.length,
    duplicate: fb.duplicate }));
}

main().catch((err) => { console.error(err.message); process.exit(1); }).finally(() => {
  history.close();
  generation.close();
});
