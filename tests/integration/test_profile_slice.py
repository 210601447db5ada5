import uuid

async def test_smoke(alice, anonymous):
    r = await anonymous.get("/health")
    assert r.status_code == 200, r.text
    r = await alice.client.post("/upsertSelfModel", json={"user_id": str(alice.user_id)})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["belief_systems"][0]["name"] == "default"
    r = await anonymous.get("/getUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
